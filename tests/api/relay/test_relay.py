"""The WebSocket relay seen from real clients: resume positions, and every bad input's close code."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.delivery import coverage
from tests.support.requests import accept, expected_text, user_message
from tests.support.stack import RunningStack
from tests.support.watchers import Watcher, close_reason, completed_session, finished, stream_url
from tokenfan.contract.keys import SessionKeys

pytestmark = pytest.mark.cluster_too


async def test_resuming_after_any_offset_yields_exactly_the_events_after_it(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    for cut in range(len(frames) - 1):
        watcher = await Watcher(stack.relay_url, session_id).connect(after=str(frames[cut]["offset"]))
        await watcher.receive_until(lambda got: bool(got) and got[-1]["type"] == "generation.completed")
        # Catching up merges runs of deltas; what they carry is exactly what followed the offset.
        assert coverage(watcher.frames) == coverage(frames[cut + 1 :])
        assert "".join(f.get("content", "") for f in watcher.frames) == "".join(
            f.get("content", "") for f in frames[cut + 1 :]
        )
        assert watcher.frames[-1] == frames[-1]
        await watcher.close()


async def test_resuming_after_the_last_offset_waits_for_what_comes_next(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    watcher = await Watcher(stack.relay_url, session_id).connect(after=str(frames[-1]["offset"]))
    body = user_message("the next one")
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    assert {frame["generation_id"] for frame in watcher.frames} == {generation_id}
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    await watcher.close()


async def test_a_subscriber_may_arrive_before_the_session_has_any_event(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    body = user_message("first words")
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    assert watcher.frames[0]["type"] == "generation.started"
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    await watcher.close()


async def test_each_frame_carries_the_documented_members(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    for frame in frames:
        assert {"offset", "type", "session_id", "generation_id", "seq"} <= set(frame)
        assert frame["session_id"] == session_id
    assert frames[0]["type"] == "generation.started"
    assert frames[-1]["type"] == "generation.completed"
    assert {"finish_reason", "usage", "length", "sha256"} <= set(frames[-1])
    # Deltas that reach the relay together are merged into one frame (seq_start..seq): under load they do.
    assert [seq for _, seq in coverage(frames)] == list(range(1, frames[-1]["seq"] + 1))


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v1/sessions/bad%7Bid/stream", 4400),
        ("/v1/sessions/.hidden/stream", 4400),
        ("/v1/sessions/ok/stream?after=not-an-offset", 4400),
        ("/v1/sessions/ok/stream?after=ABC:1-0", 4400),
        ("/v1/sessions/ok/stream?after=a:1-0&after=a:2-0", 4400),
        ("/v1/sessions/ok/stream?from=a:1-0", 4400),
        ("/v1/sessions/ok/stream?after=" + "9" * 70, 4400),
    ],
)
async def test_malformed_requests_are_closed_with_4400(stack: RunningStack, path: str, code: int) -> None:
    closed_with, reason = await close_reason(stack.relay_url + path)
    assert closed_with == code
    assert reason


async def test_an_offset_of_another_incarnation_of_the_stream_is_gone(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    epoch, entry_id = str(frames[0]["offset"]).split(":")
    other_epoch = "zz" + epoch[2:] if not epoch.startswith("zz") else "yy" + epoch[2:]
    code, reason = await close_reason(stream_url(stack.relay_url, session_id, f"{other_epoch}:{entry_id}"))
    assert code == 4410
    assert "rebuild" in reason


async def test_an_offset_for_a_session_that_does_not_exist_is_gone(
    stack: RunningStack, session_id: str
) -> None:
    code, _ = await close_reason(stream_url(stack.relay_url, session_id, "abc:1-0"))
    assert code == 4410


async def test_an_offset_naming_no_event_is_unknown(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    epoch, entry_id = str(frames[-1]["offset"]).split(":")
    milliseconds, sequence = entry_id.split("-")
    beyond = f"{epoch}:{int(milliseconds) + 10_000}-0"
    between = f"{epoch}:{milliseconds}-{int(sequence) + 7}"
    for offset in (beyond, between):
        code, reason = await close_reason(stream_url(stack.relay_url, session_id, offset))
        assert (code, offset) == (4404, offset)
        assert reason


async def test_an_offset_whose_events_were_trimmed_is_gone(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    # Keep exactly the entries after frames[-3]: under load the live edge may merge the last deltas, so the
    # last two frames can cover more than two entries.
    kept = len(coverage(frames[-2:]))
    await redis.xtrim(SessionKeys(session_id).events, maxlen=kept, approximate=False)
    code, _ = await close_reason(stream_url(stack.relay_url, session_id, str(frames[0]["offset"])))
    assert code == 4410


async def test_unknown_paths_are_refused_before_the_upgrade(stack: RunningStack) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(stack.relay_url + "/v1/elsewhere"):
            pass
    assert refused.value.response.status_code == 404


async def test_health_and_stats_answer_over_plain_http(stack: RunningStack) -> None:
    base = stack.relay_url.replace("ws://", "http://")
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/healthz")).status_code == 200
        stats = (await client.get("/stats")).json()
    assert {"sessions", "subscribers", "frames_sent"} <= set(stats)


async def test_a_client_message_is_answered_and_a_huge_one_closes_the_connection(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    assert watcher.connection is not None
    await watcher.connection.send(json.dumps({"hello": "relay"}))
    await watcher.receive_until(lambda frames: bool(frames))
    (refusal,) = watcher.frames
    assert (refusal["type"], refusal["code"]) == ("error", 4400)
    watcher.frames.clear()
    body = user_message("still streaming")
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    await watcher.connection.send("x" * 200_000)
    async with asyncio.timeout(10):
        await watcher.connection.wait_closed()
    assert watcher.connection.close_code == 1009


async def test_an_offset_that_was_trimmed_still_resumes_when_everything_after_it_is_retained(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    # Keep exactly the entries after frames[-3]: under load the live edge may merge the last deltas, so the
    # last two frames can cover more than two entries.
    kept = len(coverage(frames[-2:]))
    await redis.xtrim(SessionKeys(session_id).events, maxlen=kept, approximate=False)
    watcher = await Watcher(stack.relay_url, session_id).connect(after=str(frames[-3]["offset"]))
    await watcher.receive_until(lambda got: bool(got) and got[-1]["type"] == "generation.completed")
    assert coverage(watcher.frames) == coverage(frames[-2:])
    await watcher.close()
