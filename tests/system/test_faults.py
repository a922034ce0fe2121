"""Real faults: workers and Redis killed with SIGKILL, Redis connections cut, upstreams that stall.
Each test asserts the exact text and the terminal state its subscribers end with.

These run on a stack of their own: a persistent Redis (so it can be killed and restarted with its data),
a short lease (crash detection in about 1.5 s rather than 20 s), two attempts, a one-second upstream read
timeout, fast presence claims, and the test hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from tests.support.delivery import assert_exact_delivery
from tests.support.requests import accept, expected_text, new_session_id, user_message
from tests.support.stack import RunningStack
from tests.support.waiting import wait_for_condition
from tests.support.watchers import Watcher, finished
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.cli.processes import ChildProcess
from tokenfan.client import SessionStream
from tokenfan.client.transcript import Transcript
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.offsets import parse_offset
from tokenfan.store import Store

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def fault_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(persistent=True) as server:
        yield server


@pytest.fixture(scope="module")
def faults(fault_redis: EmbeddedRedis) -> Iterator[RunningStack]:
    stack = RunningStack(
        redis_url=fault_redis.url,
        extra_env={
            "TOKENFAN_LEASE_SECONDS": "1.5",
            "TOKENFAN_MAX_ATTEMPTS": "2",
            "TOKENFAN_UPSTREAM_READ_TIMEOUT_SECONDS": "1",
            "TOKENFAN_PRESENCE_INTERVAL_SECONDS": "0.2",
            "TOKENFAN_FEED_LINGER_SECONDS": "0.1",
            "TOKENFAN_WORKER_HOOKS": "tests.support.hooks:hooks",
        },
    )
    try:
        yield stack.start()
    except BaseException:
        print(stack.log_tail())
        raise
    finally:
        stack.stop()


@pytest.fixture
async def fapi(faults: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with faults.api_client() as client:
        yield client


@pytest.fixture
async def fredis(fault_redis: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(fault_redis.url)
    yield client
    await client.aclose()


def only_worker(stack: RunningStack) -> ChildProcess:
    (worker,) = [child for child in stack.children if child.role == "worker" and child.alive()]
    return worker


async def deltas_of(watcher: Watcher, generation_id: str, count: int) -> None:
    await watcher.receive_until(
        lambda frames: (
            sum(f["type"] == "delta" and f["generation_id"] == generation_id for f in frames) >= count
        )
    )


async def test_a_worker_killed_mid_generation_is_replaced_and_subscribers_get_one_clean_run(
    faults: RunningStack, fapi: httpx.AsyncClient, fredis: Redis
) -> None:
    session_id = new_session_id()
    body = user_message("survive a crash", {"tokens": 150, "rate": 100})
    watchers = [await Watcher(faults.relay_url, session_id).connect() for _ in range(2)]
    generation_id = await accept(fapi, session_id, body)
    await deltas_of(watchers[0], generation_id, 3)

    only_worker(faults).kill()
    faults.spawn("worker").wait_ready()

    for watcher in watchers:
        await watcher.receive_until(finished(generation_id))
        generation = watcher.transcript().generations[generation_id]
        assert generation.status is GenerationStatus.COMPLETED
        assert generation.restarts == 1
        assert generation.attempt == 2
        assert generation.text == expected_text(body)  # one clean run, whatever the first attempt showed
        await assert_exact_delivery(fredis, session_id, watcher.frames)
        await watcher.close()
    restarted = next(f for f in watchers[0].frames if f["type"] == "generation.restarted")
    assert restarted["attempt"] == 2


def clean_run(view: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]]]:
    """What a generation view (the API's, or a snapshot's) says the generation produced."""
    calls = sorted((call["index"], call["name"], call["arguments"]) for call in view["tool_calls"])
    return view["text"], view["reasoning"], [(name, arguments) for _, name, arguments in calls]


async def rebuilt_by_a_client(faults: RunningStack, session_id: str, offset: str) -> dict[str, Any]:
    """The snapshot frame a resuming client rebuilds from when its position is gone: an offset of another
    epoch makes the relay answer 4410."""
    epoch, _, entry_id = offset.partition(":")
    stale = ("zz" if not epoch.startswith("zz") else "yy") + epoch[2:] + ":" + entry_id
    stream = SessionStream(faults.relay_url, session_id, after=stale, api_url=faults.api_url)
    iterator = aiter(stream)
    try:
        async with asyncio.timeout(10):
            frame: dict[str, Any] = await anext(iterator)
    finally:
        with contextlib.suppress(Exception):
            await iterator.aclose()  # type: ignore[attr-defined]
    return frame


async def test_after_a_restart_every_view_holds_the_clean_run_only(
    faults: RunningStack, fapi: httpx.AsyncClient, fredis: Redis
) -> None:
    session_id = new_session_id()
    reasoning = ["Let ", "me ", "think ", "it ", "over."]
    calls = [{"name": "lookup", "arguments": json.dumps({"query": "fan-out " * 8})}]
    directive = {"reasoning": reasoning, "tokens": 20, "tool_calls": calls, "tool_chunk": 2, "rate": 60}
    body = user_message("restart me", directive)
    clean = (expected_text(body), "".join(reasoning), [(call["name"], call["arguments"]) for call in calls])
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, body)
    # The first attempt dies once it has streamed reasoning, content and part of its tool call.
    await watcher.receive_until(lambda frames: any("tool_calls" in frame for frame in frames))
    only_worker(faults).kill()
    faults.spawn("worker").wait_ready()
    await watcher.receive_until(finished(generation_id))
    await watcher.close()

    generation = watcher.transcript().generations[generation_id]
    assert (generation.status, generation.restarts) == (GenerationStatus.COMPLETED, 1)
    view = (await fapi.get(f"/v1/generations/{generation_id}")).json()
    assert clean_run(view) == clean
    (in_session,) = (await fapi.get(f"/v1/sessions/{session_id}")).json()["generations"]
    assert clean_run(in_session) == clean
    # What a slow consumer is sent instead of its backlog: the generations changed after its position.
    store = Store(fredis, session_ttl_seconds=3600, stream_max_length=10_000)
    since = parse_offset(watcher.frames[0]["offset"]).stream_id
    slow = await store.snapshot(session_id, since=since)
    assert slow is not None
    assert [clean_run(record.as_json()) for record in slow.generations] == [clean]
    rebuilt = await rebuilt_by_a_client(faults, session_id, watcher.frames[0]["offset"])
    assert rebuilt["type"] == "snapshot"
    transcript = Transcript()
    transcript.apply(rebuilt)
    assert transcript.generations[generation_id].text == clean[0]
    assert [clean_run(view) for view in rebuilt["generations"]] == [clean]


async def test_after_the_last_attempt_a_generation_fails_with_worker_lost(
    faults: RunningStack, fapi: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, user_message("doomed", {"tokens": 400, "rate": 100}))
    await deltas_of(watcher, generation_id, 2)
    only_worker(faults).kill()
    faults.spawn("worker").wait_ready()
    await watcher.receive_until(lambda frames: any(f["type"] == "generation.restarted" for f in frames))
    await deltas_of(watcher, generation_id, 4)
    only_worker(faults).kill()
    faults.spawn("worker").wait_ready()
    await watcher.receive_until(finished(generation_id))
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.FAILED
    assert generation.error is not None
    assert generation.error["type"] == "worker_lost"
    view = (await fapi.get(f"/v1/generations/{generation_id}")).json()
    assert view["status"] == "failed"
    await watcher.close()


async def test_a_stopped_worker_hands_its_generation_to_another(
    faults: RunningStack, fapi: httpx.AsyncClient, fredis: Redis
) -> None:
    session_id = new_session_id()
    body = user_message("graceful", {"tokens": 600, "rate": 100})
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, body)
    await deltas_of(watcher, generation_id, 3)
    leaving = only_worker(faults)
    faults.spawn("worker").wait_ready()
    assert leaving.stop() == 0  # SIGTERM: a clean exit, handing the generation back
    await watcher.receive_until(finished(generation_id))
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.restarts == 1
    assert generation.text == expected_text(body)
    await assert_exact_delivery(fredis, session_id, watcher.frames)
    await watcher.close()


async def test_redis_connections_cut_during_a_generation_lose_and_repeat_nothing(
    faults: RunningStack, fapi: httpx.AsyncClient, fredis: Redis
) -> None:
    session_id = new_session_id()
    body = user_message("under fire", {"tokens": 120, "rate": 120})
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, body)
    for round_ in range(1, 5):
        await deltas_of(watcher, generation_id, 5 * round_)
        # Every client but this one: the worker's writers, the relay's pub/sub and reads, the API's.
        await fredis.client_kill_filter(_type="normal", skipme=True)
        await fredis.client_kill_filter(_type="pubsub")
    await watcher.receive_until(finished(generation_id), timeout=40)
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    await assert_exact_delivery(fredis, session_id, watcher.frames)
    await watcher.close()


async def test_redis_killed_and_restarted_mid_generation_loses_nothing(
    faults: RunningStack, fapi: httpx.AsyncClient, fault_redis: EmbeddedRedis
) -> None:
    session_id = new_session_id()
    body = user_message("through a Redis crash", {"tokens": 150, "rate": 100})
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, body)
    await deltas_of(watcher, generation_id, 3)

    fault_redis.kill()
    fault_redis.start()  # same port, same append-only file: every acknowledged write is back

    await watcher.receive_until(finished(generation_id), timeout=45)
    transcript = watcher.transcript()
    generation = transcript.generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    # A restart may or may not have been needed (lease expiry during the outage); the text is exact either way.
    assert generation.text == expected_text(body)
    async with Redis.from_url(fault_redis.url) as redis:
        await assert_exact_delivery(redis, session_id, watcher.frames)
    await watcher.close()


async def test_a_stalled_upstream_fails_as_a_timeout_and_the_session_goes_on(
    faults: RunningStack, fapi: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    watcher = await Watcher(faults.relay_url, session_id).connect()
    stalled = await accept(fapi, session_id, user_message("stall", {"stall_after": 3}))
    after_body = user_message("after the stall")
    after = await accept(fapi, session_id, after_body)
    await watcher.receive_until(finished(stalled, after))
    transcript = watcher.transcript()
    failed = transcript.generations[stalled]
    assert failed.status is GenerationStatus.FAILED
    assert failed.error is not None
    assert failed.error["type"] == "upstream_timeout"
    assert len(failed.text) > 0  # what streamed before the stall stays
    assert transcript.generations[after].text == expected_text(after_body)
    await watcher.close()


async def test_hooks_add_custom_events_in_order(faults: RunningStack, fapi: httpx.AsyncClient) -> None:
    session_id = new_session_id()
    sources = [{"title": "Fan-out", "url": "https://example.org/fanout"}]
    body = {**user_message("cite your sources"), "metadata": {"sources": sources}}
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, body)
    await watcher.receive_until(finished(generation_id))
    kinds = [f["type"] for f in watcher.frames]
    assert kinds[:2] == ["generation.started", "x.sources"]
    assert kinds[-2:] == ["x.note", "generation.completed"]
    assert watcher.frames[1]["items"] == sources
    assert watcher.frames[-2]["status"] == "completed"
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    await watcher.close()


async def status_is(api: httpx.AsyncClient, generation_id: str, status: str) -> bool:
    """Polled every 200 ms: a cancellation for want of watchers takes seconds by design, and nothing a
    test may watch announces it (a watcher would be one)."""
    return bool((await api.get(f"/v1/generations/{generation_id}")).json()["status"] == status)


async def test_a_generation_nobody_watches_is_cancelled_when_it_asked_to_be(
    faults: RunningStack, fapi: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    body = {**user_message("walk away", {"tokens": 5000, "rate": 50}), "cancel_when_unwatched_seconds": 1}
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, body)
    await deltas_of(watcher, generation_id, 2)
    await watcher.close()  # the only subscriber walks away
    await wait_for_condition(
        lambda: status_is(fapi, generation_id, "cancelled"),
        timeout=20,
        interval=0.2,
        message="never cancelled",
    )
    late = await Watcher(faults.relay_url, session_id).connect()
    await late.receive_until(finished(generation_id))
    assert late.frames[-1]["reason"] == "unwatched"
    await late.close()


async def test_an_openai_client_that_leaves_leaves_its_generation_to_the_unwatched_policy(
    faults: RunningStack, fapi: httpx.AsyncClient
) -> None:
    sdk = openai.AsyncOpenAI(base_url=f"{faults.api_url}/v1", api_key="unused", max_retries=0)
    messages = user_message("walk away from the front door", {"tokens": 5000, "rate": 50})["messages"]
    raw = await sdk.chat.completions.with_raw_response.create(
        model="tokenfan-sim",
        messages=messages,
        stream=True,
        extra_body={"cancel_when_unwatched_seconds": 1},
        extra_headers={"Authorization": openai.omit},  # development mode: no key exists, so send none
    )
    generation_id = raw.headers["x-tokenfan-generation"]
    stream = raw.parse()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    await sdk.close()
    await wait_for_condition(
        lambda: status_is(fapi, generation_id, "cancelled"),
        timeout=20,
        interval=0.2,
        message="never cancelled",
    )
    late = await Watcher(faults.relay_url, raw.headers["x-tokenfan-session"]).connect()
    await late.receive_until(finished(generation_id))
    assert late.frames[-1]["reason"] == "unwatched"
    await late.close()


async def test_a_watched_generation_with_the_same_policy_completes(
    faults: RunningStack, fapi: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    body = {**user_message("keep watching", {"tokens": 150, "rate": 100}), "cancel_when_unwatched_seconds": 1}
    watcher = await Watcher(faults.relay_url, session_id).connect()
    generation_id = await accept(fapi, session_id, body)
    await watcher.receive_until(finished(generation_id))
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    await watcher.close()
