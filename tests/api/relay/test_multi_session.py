"""Multi-session connections (``ws://relay/v1/stream``): several sessions on one WebSocket, and errors that
end one subscription, never the connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.delivery import assert_exact_delivery, coverage, transcript_of
from tests.support.requests import accept, expected_text, new_session_id, user_message
from tests.support.stack import RunningStack, start_frontends
from tests.support.waiting import Closer
from tests.support.watchers import MultiWatcher, Watcher, completed_session, finished
from tokenfan.contract.events import GenerationStatus

pytestmark = pytest.mark.cluster_too

#: TOKENFAN_RELAY_MAX_SUBSCRIPTIONS of the `few_subscriptions` relay.
MAX_SUBSCRIPTIONS = 3


@pytest.fixture(scope="module")
def few_subscriptions(stack: RunningStack) -> Iterator[RunningStack]:
    """A relay that lets one connection watch at most `MAX_SUBSCRIPTIONS` sessions."""
    front = start_frontends(stack, {"TOKENFAN_RELAY_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS)}, api=False)
    yield front
    front.stop()


def session_ended(multi: MultiWatcher, session_id: str, since: int) -> Callable[[list[dict[str, Any]]], bool]:
    """A `receive_until` condition: the session's last frame since `since` ends a generation normally."""

    def done(_: list[dict[str, Any]]) -> bool:
        frames = multi.frames(session_id, since)
        return bool(frames) and frames[-1]["type"] == "generation.completed"

    return done


async def assert_still_serves(multi: MultiWatcher, redis: Redis, session_id: str, generation_id: str) -> None:
    """A later subscription on the same connection works: acknowledged, then the whole history."""
    since = len(multi.messages)
    assert await multi.subscribe(session_id) == {"type": "subscribed", "session_id": session_id}
    await multi.receive_until(lambda _: finished(generation_id)(multi.frames(session_id, since)))
    await assert_exact_delivery(redis, session_id, multi.frames(session_id, since))


async def test_two_sessions_on_one_connection_each_arrive_exactly(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, redis: Redis
) -> None:
    sessions = [new_session_id(), new_session_id()]
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    for session_id in sessions:
        assert await multi.subscribe(session_id) == {"type": "subscribed", "session_id": session_id}
    bodies = [user_message(f"session {n}", {"tokens": 40, "rate": 400}) for n in range(2)]
    generation_ids = list(
        await asyncio.gather(*(accept(api, s, body) for s, body in zip(sessions, bodies, strict=True)))
    )
    await multi.receive_until(finished(*generation_ids))

    for session_id, body, generation_id in zip(sessions, bodies, generation_ids, strict=True):
        frames = multi.frames(session_id)
        assert {frame["generation_id"] for frame in frames} == {generation_id}
        generation = transcript_of(frames).generations[generation_id]
        assert generation.status is GenerationStatus.COMPLETED
        assert generation.text == expected_text(body)
        await assert_exact_delivery(redis, session_id, frames)
    # Every message is either an acknowledgement or an event of one of the two sessions.
    events = [m for m in multi.messages if "offset" in m]
    assert len(events) == sum(len(multi.frames(s)) for s in sessions)
    await multi.close()


async def test_after_unsubscribe_no_frame_of_that_session_arrives(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, redis: Redis
) -> None:
    s1, s2 = new_session_id(), new_session_id()
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    await multi.subscribe(s1)
    await multi.subscribe(s2)
    first = await accept(api, s1, user_message("before"))
    await multi.receive_until(finished(first))  # s1 is live on this connection

    assert await multi.unsubscribe(s1) == {"type": "unsubscribed", "session_id": s1}
    acknowledged = len(multi.messages)
    # s1 runs a whole generation (a watcher of its own sees it end) before s2 even starts one.
    elsewhere = await opened(Watcher(stack.relay_url, s1)).connect(after=multi.frames(s1)[-1]["offset"])
    unseen = await accept(api, s1, user_message("nobody here"))
    await elsewhere.receive_until(finished(unseen))
    await elsewhere.close()
    body = user_message("still watched")
    seen = await accept(api, s2, body)
    await multi.receive_until(finished(seen))

    assert multi.frames(s1, since=acknowledged) == []
    assert transcript_of(multi.frames(s2)).generations[seen].text == expected_text(body)
    await assert_exact_delivery(redis, s2, multi.frames(s2))
    await multi.close()


async def test_subscribe_with_after_resumes_exactly(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    for cut in (0, 1, len(frames) // 2, len(frames) - 2):
        since = len(multi.messages)
        answer = await multi.subscribe(session_id, after=frames[cut]["offset"])
        assert answer == {"type": "subscribed", "session_id": session_id}
        await multi.receive_until(session_ended(multi, session_id, since))
        got = multi.frames(session_id, since)
        assert coverage(got) == coverage(frames[cut + 1 :])
        assert got[-1] == frames[-1]
        # The acknowledgement came before the session's frames.
        assert multi.messages[since] == answer
        assert await multi.unsubscribe(session_id) == {"type": "unsubscribed", "session_id": session_id}
    await multi.close()


@pytest.mark.parametrize(
    "message",
    [
        "{not json",
        b"\x00\x01binary",
        json.dumps({"type": "watch", "session_id": "s1"}),
        json.dumps({"type": "subscribe"}),
        json.dumps({"type": "subscribe", "session_id": 42}),
        json.dumps(["subscribe", "s1"]),
        json.dumps({"type": "subscribe", "session_id": "bad{id"}),
        '{"type": "subscribe", "session_id": "\\ud800"}',  # a lone surrogate, echoed in the error frame
    ],
    ids=[
        "invalid-json",
        "binary",
        "unknown-type",
        "no-session-id",
        "session-id-not-a-string",
        "not-an-object",
        "bad-session-id",
        "lone-surrogate-session-id",
    ],
)
async def test_a_malformed_message_is_answered_with_an_error_and_the_connection_goes_on(
    opened: Closer,
    stack: RunningStack,
    api: httpx.AsyncClient,
    redis: Redis,
    session_id: str,
    message: str | bytes,
) -> None:
    generation_id = await accept(api, session_id, user_message("history"))
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    answer = await multi.request(message)
    assert answer["type"] == "error"
    assert answer["code"] == 4400
    assert answer["reason"]
    await assert_still_serves(multi, redis, session_id, generation_id)
    await multi.close()


@pytest.mark.parametrize(
    "message",
    [
        '{"type": "subscribe", "session_id": "SESSION", "token": "\\ud800"}',
        '{"type": "refresh", "token": "a.b.\\udfff"}',
    ],
    ids=["subscribe", "refresh"],
)
async def test_a_credential_that_is_not_valid_unicode_is_refused_and_the_connection_goes_on(
    opened: Closer,
    stack: RunningStack,
    api: httpx.AsyncClient,
    redis: Redis,
    session_id: str,
    message: str,
) -> None:
    generation_id = await accept(api, session_id, user_message("history"))
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    answer = await multi.request(message.replace("SESSION", session_id))
    assert (answer["type"], answer["code"]) == ("error", 4401)
    await assert_still_serves(multi, redis, session_id, generation_id)
    await multi.close()


async def test_a_malformed_offset_is_an_error_of_that_subscription(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    generation_id = await accept(api, session_id, user_message("history"))
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    answer = await multi.subscribe(session_id, after="not-an-offset")
    assert answer["type"] == "error"
    assert answer["code"] == 4400
    assert answer.get("session_id") == session_id
    # The failed subscription did not take the session: subscribing again works.
    await assert_still_serves(multi, redis, session_id, generation_id)
    await multi.close()


async def test_an_offset_of_another_incarnation_is_an_error_4410_of_that_subscription(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    epoch, entry_id = str(frames[0]["offset"]).split(":")
    other_epoch = "zz" + epoch[2:] if not epoch.startswith("zz") else "yy" + epoch[2:]
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    answer = await multi.subscribe(session_id, after=f"{other_epoch}:{entry_id}")
    assert answer["type"] == "error"
    assert answer["code"] == 4410
    assert answer.get("session_id") == session_id
    await assert_still_serves(multi, redis, session_id, frames[-1]["generation_id"])
    await multi.close()


async def test_subscribing_twice_to_one_session_is_an_error(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    generation_id = await accept(api, session_id, user_message("history"))
    multi = await opened(MultiWatcher(stack.relay_url)).connect()
    assert await multi.subscribe(session_id) == {"type": "subscribed", "session_id": session_id}
    await multi.receive_until(lambda _: finished(generation_id)(multi.frames(session_id)))
    received = len(multi.frames(session_id))
    answer = await multi.subscribe(session_id)
    assert answer["type"] == "error"
    assert answer["code"] == 4400
    # The first subscription goes on, unduplicated: the next generation arrives once.
    body = user_message("the next one")
    next_id = await accept(api, session_id, body)
    await multi.receive_until(lambda _: finished(next_id)(multi.frames(session_id)))
    await assert_exact_delivery(redis, session_id, multi.frames(session_id))
    assert transcript_of(multi.frames(session_id)[received:]).generations[next_id].text == expected_text(body)
    await multi.close()


async def test_a_subscription_beyond_the_limit_is_refused_and_the_connection_goes_on(
    opened: Closer, few_subscriptions: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    multi = await opened(MultiWatcher(few_subscriptions.relay_url)).connect()
    others = [new_session_id() for _ in range(MAX_SUBSCRIPTIONS)]
    for other in others:
        assert await multi.subscribe(other) == {"type": "subscribed", "session_id": other}
    generation_id = await accept(api, session_id, user_message("one too many"))
    answer = await multi.subscribe(session_id)
    assert answer["type"] == "error"
    assert answer["code"] == 4400
    assert answer["reason"]
    # Making room makes the same subscription work.
    assert await multi.unsubscribe(others[0]) == {"type": "unsubscribed", "session_id": others[0]}
    await assert_still_serves(multi, redis, session_id, generation_id)
