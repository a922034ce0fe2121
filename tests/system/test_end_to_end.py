"""The whole flow with real processes: HTTP API -> arq -> worker -> Redis Stream -> relay -> WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from redis.asyncio import Redis

from tests.support.delivery import assert_exact_delivery, stream_contents, transcript_of
from tests.support.requests import accept, expected_text, user_message
from tests.support.stack import RunningStack
from tests.support.waiting import wait_for_condition
from tests.support.watchers import Watcher, finished
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_generation_id
from tokenfan.store import Store, redis_client
from tokenfan.store.jobs import create_queue, enqueue_generation


async def test_three_subscribers_one_cut_mid_stream_all_end_with_the_upstream_text(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    body = user_message("fan this out", {"rate": 150, "tokens": 60})
    watchers = [await Watcher(stack.relay_url, session_id).connect() for _ in range(3)]
    generation_id = await accept(api, session_id, body)

    cut = watchers[0]
    await cut.receive_until(lambda frames: any(frame["type"] == "delta" for frame in frames))
    seen_before_cut = len(cut.frames)
    assert cut.connection is not None
    cut.connection.transport.abort()  # the network drops: no closing handshake
    await cut.connect(after=cut.last_offset)

    await asyncio.gather(*(watcher.receive_until(finished(generation_id)) for watcher in watchers))
    for watcher in watchers:
        transcript = watcher.transcript()  # raises on any duplicate, reordering or seq gap
        generation = transcript.generations[generation_id]
        assert generation.status is GenerationStatus.COMPLETED
        assert generation.text == expected_text(body)
        await assert_exact_delivery(redis, session_id, watcher.frames)
    # The cut really happened mid-stream: the end arrived on the second connection.
    assert any(frame["type"] == "generation.completed" for frame in cut.frames[seen_before_cut:])
    assert not any(frame["type"] == "generation.completed" for frame in cut.frames[:seen_before_cut])
    for watcher in watchers:
        await watcher.close()


async def test_late_joiner_receives_the_whole_history(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    body = user_message("history please")
    early = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await early.receive_until(finished(generation_id))

    late = await Watcher(stack.relay_url, session_id).connect()
    await late.receive_until(finished(generation_id))
    assert late.transcript().generations[generation_id].text == expected_text(body)
    await assert_exact_delivery(redis, session_id, late.frames)
    await assert_exact_delivery(redis, session_id, early.frames)
    await early.close()
    await late.close()


def deltas_seen(generation_id: str, count: int) -> Any:
    """A `receive_until` condition: `count` deltas of the generation arrived."""
    return lambda frames: (
        sum(f["type"] == "delta" and f["generation_id"] == generation_id for f in frames) >= count
    )


async def test_a_subscriber_joining_mid_generation_gets_its_history_then_its_live_tail(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    body = user_message("join me midway", {"tokens": 150, "rate": 100})  # 1.5 s of tokens
    early = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await early.receive_until(deltas_seen(generation_id, 5))
    assert not finished(generation_id)(early.frames)
    late = await Watcher(stack.relay_url, session_id).connect()  # no `after`: everything, then live
    await late.receive_until(finished(generation_id))
    await early.receive_until(finished(generation_id))
    for watcher in (early, late):
        assert watcher.transcript().generations[generation_id].text == expected_text(body)
        await assert_exact_delivery(redis, session_id, watcher.frames)
        await watcher.close()


async def test_a_snapshot_read_while_a_generation_runs_rebuilds_it_exactly(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    """The way a client rebuilds: a snapshot, then the stream after its offset; with reasoning and a tool
    call, which the snapshot holds too, and which the end proves."""
    thoughts = ["First ", "I ", "think."]
    calls = [{"name": "lookup", "arguments": json.dumps({"q": "fan-out"})}]
    directive = {"reasoning": thoughts, "tokens": 150, "rate": 100, "tool_calls": calls}
    body = user_message("snapshot me midway", directive)
    early = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await early.receive_until(lambda frames: any("content" in frame for frame in frames))

    snapshot = (await api.get(f"/v1/sessions/{session_id}")).json()
    view = (await api.get(f"/v1/generations/{generation_id}")).json()
    (held,) = snapshot["generations"]
    assert expected_text(body).startswith(held["text"])
    assert view["seq"] >= held["seq"]  # read after it: as far, or further
    rest = await Watcher(stack.relay_url, session_id).connect(after=snapshot["offset"])
    await rest.receive_until(finished(generation_id))
    await early.receive_until(finished(generation_id))
    rebuilt = transcript_of([{"type": "snapshot", **snapshot}, *rest.frames]).generations[generation_id]
    assert rebuilt.status is GenerationStatus.COMPLETED  # and every digest of its end held
    assert (rebuilt.text, rebuilt.reasoning_text) == (expected_text(body), "".join(thoughts))
    assert [(c["name"], c["arguments"]) for c in rebuilt.tool_calls.values()] == [
        (call["name"], call["arguments"]) for call in calls
    ]
    # The snapshot is exactly the stream up to its offset.
    before = [
        frame
        for frame in early.frames
        if frame["offset"] in await offsets_through(redis, session_id, snapshot["offset"])
    ]
    assert "".join(frame.get("content", "") for frame in before) == held["text"]
    assert "".join(frame.get("reasoning", "") for frame in before) == held["reasoning"]
    for watcher in (early, rest):
        await watcher.close()


async def offsets_through(redis: Redis, session_id: str, offset: str) -> set[str]:
    """The offsets of the session's stream up to and including `offset`."""
    offsets, _ = await stream_contents(redis, session_id)
    return set(offsets[: offsets.index(offset) + 1])


async def test_two_generations_of_one_session_run_in_order_and_never_interleave(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    first_body = user_message("first", {"rate": 400, "tokens": 40})
    second_body = user_message("second", {"rate": 400, "tokens": 40})
    watcher = await Watcher(stack.relay_url, session_id).connect()
    first = await accept(api, session_id, first_body)
    response = await api.post(f"/v1/sessions/{session_id}/generations", json=second_body)
    assert response.json()["queue_position"] == 2
    second = response.json()["generation_id"]

    await watcher.receive_until(finished(first, second))
    owners = [frame["generation_id"] for frame in watcher.frames]
    assert owners == [first] * owners.count(first) + [second] * owners.count(second)
    transcript = watcher.transcript()
    assert transcript.generations[first].text == expected_text(first_body)
    assert transcript.generations[second].text == expected_text(second_body)
    first_view = (await api.get(f"/v1/generations/{first}")).json()
    second_view = (await api.get(f"/v1/generations/{second}")).json()
    assert second_view["started_at_ms"] >= first_view["finished_at_ms"]
    await watcher.close()


async def test_many_generations_queued_at_once_complete_in_acceptance_order(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    bodies = [user_message(f"prompt {n}", {"tokens": 5}) for n in range(8)]
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_ids = list(await asyncio.gather(*(accept(api, session_id, body) for body in bodies)))
    await watcher.receive_until(finished(*generation_ids))
    started = [frame["generation_id"] for frame in watcher.frames if frame["type"] == "generation.started"]
    positions = [
        (await api.get(f"/v1/generations/{generation_id}")).json()["created_at_ms"]
        for generation_id in started
    ]
    assert sorted(started) == sorted(generation_ids)
    assert positions == sorted(positions)  # they ran in the order they were accepted
    await watcher.close()


async def test_an_upstream_client_error_fails_the_generation_and_the_worker_serves_the_next(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    broken = user_message("bad request", {"status": 400})
    healthy = user_message("after the failure")
    watcher = await Watcher(stack.relay_url, session_id).connect()
    failed_id = await accept(api, session_id, broken)
    next_id = await accept(api, session_id, healthy)
    await watcher.receive_until(finished(failed_id, next_id))
    transcript = watcher.transcript()
    failed = transcript.generations[failed_id]
    assert failed.status is GenerationStatus.FAILED
    assert failed.error is not None
    assert failed.error["type"] == "upstream_rejected"
    assert failed.error["status"] == 400
    assert transcript.generations[next_id].text == expected_text(healthy)
    view = (await api.get(f"/v1/generations/{failed_id}")).json()
    assert view["status"] == "failed"
    assert view["error"]["type"] == "upstream_rejected"
    await watcher.close()


async def test_a_persistent_server_error_is_retried_then_fails_as_unavailable(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    body = user_message(
        "always 503", {"status": 503, "times": 100, "key": uuid.uuid4().hex, "retry_after": 0.05}
    )
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.FAILED
    assert generation.error is not None
    assert generation.error["type"] == "upstream_unavailable"
    assert generation.error["status"] == 503
    await watcher.close()


async def test_a_rate_limit_before_the_first_token_is_retried_and_the_text_is_complete(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    body = user_message(
        "busy provider", {"status": 429, "times": 1, "key": uuid.uuid4().hex, "retry_after": 0.05}
    )
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    await watcher.close()


async def test_a_stream_that_drops_midway_fails_as_disconnected_keeping_what_was_shown(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    body = user_message("drop me", {"drop_after": 5})
    healthy = user_message("and carry on")
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    next_id = await accept(api, session_id, healthy)
    await watcher.receive_until(finished(generation_id, next_id))
    transcript = watcher.transcript()
    generation = transcript.generations[generation_id]
    assert generation.status is GenerationStatus.FAILED
    assert generation.error is not None
    assert generation.error["type"] == "upstream_disconnected"
    assert generation.text == "".join(expected_text_pieces(body)[:5])
    assert transcript.generations[next_id].status is GenerationStatus.COMPLETED
    await watcher.close()


async def test_an_error_inside_the_stream_fails_the_generation(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    body = user_message("error midway", {"error_after": 3})
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.FAILED
    assert generation.error is not None
    assert generation.error["type"] == "upstream_error"
    assert "simulated mid-stream error" in generation.error["message"]
    await watcher.close()


async def test_usage_comes_from_the_final_chunk_and_is_estimated_when_the_upstream_sends_none(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    with_usage = user_message("count me", {"tokens": 12})
    without_usage = user_message("do not count me", {"usage": "none"})
    watcher = await Watcher(stack.relay_url, session_id).connect()
    first = await accept(api, session_id, with_usage)
    second = await accept(api, session_id, without_usage)
    await watcher.receive_until(finished(first, second))
    completed = {
        frame["generation_id"]: frame for frame in watcher.frames if frame["type"] == "generation.completed"
    }
    assert completed[first]["usage"]["completion_tokens"] == 12
    assert "estimated" not in completed[first]["usage"]
    assert completed[first]["finish_reason"] == "stop"
    estimate = completed[second]["usage"]
    assert estimate["estimated"] is True
    assert estimate["tokenizer"] == "heuristic"  # the simulator's model is not an OpenAI one
    assert estimate["completion_tokens"] > 0
    assert estimate["total_tokens"] == estimate["prompt_tokens"] + estimate["completion_tokens"]
    assert watcher.transcript().generations[second].status is GenerationStatus.COMPLETED
    await watcher.close()


def expected_text_pieces(body: dict[str, Any]) -> list[str]:
    from tests.support.requests import SIMULATOR
    from tokenfan.cli.simulator import reply_chunks

    return reply_chunks(body, SIMULATOR)


ApiSteps = tuple[Redis, ArqRedis, Store]


@pytest.fixture
async def api_steps(redis_server: Any) -> AsyncIterator[ApiSteps]:
    """What the API uses to accept and enqueue, for tests that take its steps one at a time."""
    redis = redis_client(redis_server.url)
    queue = await create_queue(redis_server.url)
    yield redis, queue, Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    await queue.aclose()
    await redis.aclose()


async def test_the_next_generation_runs_even_when_its_early_job_still_holds_the_job_id(
    stack: RunningStack, api_steps: ApiSteps, session_id: str
) -> None:
    # The API enqueues a job before accepting. For a generation accepted behind another, that early job
    # runs, finds it waiting and ends. If the one ahead finishes while that job is still in progress, arq
    # refuses the hand-over (the job id is taken), and the generation must not be left queued forever.
    redis, queue, store = api_steps
    watcher = await Watcher(stack.relay_url, session_id).connect()
    first_body, second_body = user_message("ahead", {"tokens": 20}), user_message("behind")
    first, second = new_generation_id(), new_generation_id()
    await store.accept(session_id, first, request=first_body, model=first_body["model"])
    await enqueue_generation(queue, session_id, first)
    await store.accept(session_id, second, request=second_body, model=second_body["model"])
    early_job = job_key_prefix + second  # the early job of `second`, still in progress
    await redis.set(early_job, b"in progress", px=60_000)

    await watcher.receive_until(finished(first))
    assert await store.is_queued(session_id, second)  # the hand-over was refused: the id is taken
    await redis.delete(early_job)  # that job ends, having found its generation waiting
    await watcher.receive_until(finished(second))
    assert watcher.transcript().generations[second].text == expected_text(second_body)
    await watcher.close()


async def test_a_generation_accepted_by_an_api_that_died_right_after_still_runs(
    stack: RunningStack, api_steps: ApiSteps, session_id: str
) -> None:
    # What the API does, step by step, stopping where a crash would: the job is enqueued first, the
    # generation accepted, and the second enqueue never happens.
    _, queue, store = api_steps
    watcher = await Watcher(stack.relay_url, session_id).connect()
    body = user_message("orphaned")
    generation_id = new_generation_id()
    await enqueue_generation(queue, session_id, generation_id)
    await store.accept(session_id, generation_id, request=body, model=body["model"])
    await watcher.receive_until(finished(generation_id))
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    await watcher.close()


async def test_a_job_that_runs_before_its_generation_is_accepted_waits_for_it(
    stack: RunningStack, api_steps: ApiSteps, session_id: str
) -> None:
    redis, queue, store = api_steps
    watcher = await Watcher(stack.relay_url, session_id).connect()
    body = user_message("slow acceptance")
    generation_id = new_generation_id()
    await enqueue_generation(queue, session_id, generation_id)

    # Wait until the worker has run the job and found nothing to do: arq recorded a first try.
    async def tried() -> bool:
        return bool(await redis.exists(f"arq:retry:{generation_id}"))

    await wait_for_condition(tried, interval=0.01, message="the worker never ran the early job")
    await store.accept(session_id, generation_id, request=body, model=body["model"])
    await watcher.receive_until(finished(generation_id))
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    await watcher.close()


def log_lines(stack: RunningStack, mentioning: str) -> list[dict[str, Any]]:
    """Every JSON log line of the stack's processes in which `mentioning` appears, with its file's name."""
    lines = []
    for path in sorted(stack.logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if mentioning in line:
                with contextlib.suppress(ValueError):
                    lines.append({**json.loads(line), "file": path.name})
    return lines


async def test_every_log_line_of_a_generation_names_its_session_generation_and_job(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    """docs/OPERATIONS.md: events about a generation carry session_id, generation_id and, in the worker,
    job_id; whichever process writes them, and whoever writes them (our code, or a library's)."""
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, user_message("log me", {"tokens": 5}))
    await watcher.receive_until(finished(generation_id))
    await watcher.close()
    assert (await api.get(f"/v1/generations/{generation_id}")).status_code == 200
    assert (await api.post(f"/v1/generations/{generation_id}/cancel")).status_code == 200

    def worker_done(lines: list[dict[str, Any]]) -> bool:
        return any(line["event"] == "generation_finished" for line in lines)

    def api_done(lines: list[dict[str, Any]]) -> bool:
        return any(line.get("path") == f"/v1/generations/{generation_id}/cancel" for line in lines)

    async def written() -> bool:  # a process logs a request after answering it
        lines = log_lines(stack, generation_id)
        return worker_done(lines) and api_done(lines)

    await wait_for_condition(written)
    lines = log_lines(stack, generation_id)
    assert {line["component"] for line in lines} >= {"api", "worker"}
    for line in lines:
        assert (line.get("session_id"), line.get("generation_id")) == (session_id, generation_id), line
        if line["component"] == "worker":
            assert line.get("job_id") == generation_id, line
