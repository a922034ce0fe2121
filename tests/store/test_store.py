"""The store's Lua scripts against a real Valkey: queueing, fencing, exactly-once appends, resume checks."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from tests.support.requests import new_session_id
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.errors import OffsetGone, UnknownOffset
from tokenfan.contract.events import EventType, GenerationStatus, encode_body, event_body, text_sha256
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import ARQ_IN_PROGRESS_PREFIX, GenerationField, SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import (
    AcceptOutcome,
    EventWrite,
    Finish,
    StartOutcome,
    StartResult,
    Store,
    WriteItem,
    WriteOutcome,
    slot_of,
)

T = TypeVar("T")

REQUEST: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "héllo"}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def resolved(value: Awaitable[T] | T) -> T:
    """Await a redis-py command (typed as "awaitable or not", since one class serves sync and async)."""
    assert inspect.isawaitable(value)
    return await value


def make_store(redis: Redis, **options: Any) -> Store:
    values: dict[str, Any] = {"session_ttl_seconds": 3600, "stream_max_length": 1000}
    values.update(options)
    return Store(redis, **values)


def delta(session_id: str, generation_id: str, seq: int, text: str = "x") -> EventWrite:
    body = event_body(
        EventType.DELTA, session_id=session_id, generation_id=generation_id, seq=seq, content=text
    )
    return EventWrite(seq, encode_body(body), text)


def deltas(session_id: str, generation_id: str, texts: str, first_seq: int = 1) -> list[EventWrite]:
    return [delta(session_id, generation_id, first_seq + i, text) for i, text in enumerate(texts)]


def completed(session_id: str, generation_id: str, seq: int, text: str) -> EventWrite:
    body = event_body(
        EventType.GENERATION_COMPLETED,
        session_id=session_id,
        generation_id=generation_id,
        seq=seq,
        finish_reason="stop",
        usage=USAGE,
        length=len(text),
        sha256=text_sha256(text),
    )
    return EventWrite(seq, encode_body(body))


async def accept(store: Store, session_id: str) -> str:
    generation_id = new_generation_id()
    result = await store.accept(session_id, generation_id, request=REQUEST, model="m")
    assert result.outcome is AcceptOutcome.ACCEPTED
    return generation_id


async def running(store: Store, session_id: str) -> tuple[str, int]:
    generation_id = await accept(store, session_id)
    start = await store.start(session_id, generation_id)
    assert start.outcome is StartOutcome.STARTED
    return generation_id, start.attempt


async def stream_ids(redis: Redis, session_id: str) -> list[StreamId]:
    entries = await redis.xrange(SessionKeys(session_id).events)
    return [StreamId.parse(entry_id) for entry_id, _ in entries]


async def stream_texts(redis: Redis, session_id: str) -> list[str]:
    entries = await redis.xrange(SessionKeys(session_id).events)
    return [json.loads(fields[b"d"]).get("content", "") for _, fields in entries]


async def queue_of(redis: Redis, session_id: str) -> list[str]:
    return [raw.decode() for raw in await resolved(redis.lrange(SessionKeys(session_id).queue, 0, -1))]


async def start_after_lease(store: Store, session_id: str, generation_id: str) -> StartResult:
    """Call `start` until the live lease has expired; the store says how long it has left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while True:
        result = await store.start(session_id, generation_id)
        if result.outcome is not StartOutcome.BUSY:
            return result
        assert result.busy_for_ms > 0
        assert loop.time() < deadline, "the lease never expired"
        await asyncio.sleep(result.busy_for_ms / 1000)


# --- accept


async def test_accept_queues_generations_in_order(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    first, second = new_generation_id(), new_generation_id()
    one = await store.accept(session_id, first, request=REQUEST, model="m")
    two = await store.accept(session_id, second, request=REQUEST, model="m")
    assert (one.outcome, one.generation_id, one.queue_position) == (AcceptOutcome.ACCEPTED, first, 1)
    assert (two.outcome, two.generation_id, two.queue_position) == (AcceptOutcome.ACCEPTED, second, 2)
    assert one.epoch
    assert two.epoch == one.epoch
    assert await queue_of(redis, session_id) == [first, second]
    assert await store.session_of(first) == session_id
    record = await store.generation(first)
    assert record is not None
    assert record.status is GenerationStatus.QUEUED
    assert record.model == "m"
    assert record.attempt == 0
    assert record.text == ""
    assert record.created_ms is not None
    assert record.first_offset is None
    ttl = await resolved(redis.ttl(SessionKeys(session_id).meta))
    assert 0 < ttl <= 3600


async def test_reject_policy_on_a_busy_session_names_the_head(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    idle = await store.accept(session_id, new_generation_id(), request=REQUEST, model="m", policy="reject")
    assert idle.outcome is AcceptOutcome.ACCEPTED
    refused = await store.accept(session_id, new_generation_id(), request=REQUEST, model="m", policy="reject")
    assert refused.outcome is AcceptOutcome.CONFLICT
    assert refused.generation_id == idle.generation_id
    assert refused.queue_position == 0
    assert await queue_of(redis, session_id) == [idle.generation_id]


async def test_idempotency_key_returns_the_first_generation(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    first = await store.accept(
        session_id, new_generation_id(), request=REQUEST, model="m", idempotency_key="k1"
    )
    again = await store.accept(
        session_id, new_generation_id(), request=REQUEST, model="m", idempotency_key="k1"
    )
    assert again.outcome is AcceptOutcome.DUPLICATE
    assert again.generation_id == first.generation_id
    assert again.queue_position == 1
    assert again.epoch == first.epoch
    other = await store.accept(
        session_id, new_generation_id(), request=REQUEST, model="m", idempotency_key="k2"
    )
    assert other.outcome is AcceptOutcome.ACCEPTED
    assert await queue_of(redis, session_id) == [first.generation_id, other.generation_id]


async def test_a_retried_accept_is_a_duplicate_queued_once(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id = new_generation_id()
    first = await store.accept(session_id, generation_id, request=REQUEST, model="m")
    retried = await store.accept(session_id, generation_id, request=REQUEST, model="m")
    assert first.outcome is AcceptOutcome.ACCEPTED
    assert retried.outcome is AcceptOutcome.DUPLICATE
    assert retried.generation_id == generation_id
    assert retried.queue_position == 1
    assert await queue_of(redis, session_id) == [generation_id]
    generations = await resolved(redis.lrange(SessionKeys(session_id).generations, 0, -1))
    assert generations == [generation_id.encode()]


# --- start and leases


async def test_start_then_busy_while_the_lease_lives(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id = await accept(store, session_id)
    start = await store.start(session_id, generation_id)
    assert start.outcome is StartOutcome.STARTED
    assert start.attempt == 1
    assert start.last_seq == 0
    assert start.request == REQUEST
    busy = await store.start(session_id, generation_id)
    assert busy.outcome is StartOutcome.BUSY
    assert 0 < busy.busy_for_ms <= 30_000
    record = await store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.RUNNING
    assert record.attempt == 1
    assert record.started_ms is not None


async def test_an_expired_lease_restarts_until_attempts_are_exhausted(redis: Redis, session_id: str) -> None:
    store = make_store(redis, lease_ms=50, max_attempts=2)
    generation_id = await accept(store, session_id)
    first = await store.start(session_id, generation_id)
    assert (first.outcome, first.attempt) == (StartOutcome.STARTED, 1)
    await store.write([WriteItem(session_id, generation_id, 1, deltas(session_id, generation_id, "ab"))])
    second = await start_after_lease(store, session_id, generation_id)
    assert (second.outcome, second.attempt) == (StartOutcome.RESTARTED, 2)
    assert second.last_seq == 2  # the next attempt continues the seq
    assert second.request == REQUEST
    third = await start_after_lease(store, session_id, generation_id)
    assert (third.outcome, third.attempt) == (StartOutcome.EXHAUSTED, 3)


async def test_start_on_a_finished_or_unknown_generation(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
    item = WriteItem(
        session_id, generation_id, attempt, [completed(session_id, generation_id, 1, "")], finish
    )
    (result,) = await store.write([item])
    assert result.outcome is WriteOutcome.OK
    terminal = await store.start(session_id, generation_id)
    assert terminal.outcome is StartOutcome.TERMINAL
    missing = await store.start(session_id, new_generation_id())
    assert missing.outcome is StartOutcome.MISSING
    assert missing.request is None


async def test_release_lease_lets_a_new_start_restart_at_once(redis: Redis, session_id: str) -> None:
    store = make_store(redis)  # a 30 s lease: only the release can explain an immediate restart
    generation_id, attempt = await running(store, session_id)
    await store.release_lease(session_id, generation_id, attempt)
    restarted = await store.start(session_id, generation_id)
    assert (restarted.outcome, restarted.attempt) == (StartOutcome.RESTARTED, 2)


async def test_renew_leases_reports_cancel_and_fencing(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.renew_leases([]) == []
    generation_id, attempt = await running(store, session_id)
    other_session = new_session_id()
    other_id, other_attempt = await running(store, other_session)
    both = [(session_id, generation_id, attempt), (other_session, other_id, other_attempt)]
    assert await store.renew_leases(both) == ["", ""]
    cancel_key = SessionKeys(session_id).generation(generation_id)
    await resolved(redis.hset(cancel_key, GenerationField.CANCEL_REQUESTED, "user"))
    renewed = await store.renew_leases(
        [(session_id, generation_id, attempt), (other_session, other_id, other_attempt + 1)]
    )
    assert renewed == ["user", "fenced"]
    await store.release_lease(session_id, generation_id, attempt)
    await store.start(session_id, generation_id)  # attempt 2 takes over
    assert await store.renew_leases([(session_id, generation_id, attempt)]) == ["fenced"]


async def test_renewing_extends_the_lease(redis: Redis, session_id: str) -> None:
    store = make_store(redis, lease_ms=60_000)
    generation_id, attempt = await running(store, session_id)
    key = SessionKeys(session_id).generation(generation_id)
    before = int(await resolved(redis.hget(key, "lease_until_ms")) or 0)
    await store.release_lease(session_id, generation_id, attempt)
    assert int(await resolved(redis.hget(key, "lease_until_ms")) or 0) == 0
    assert await store.renew_leases([(session_id, generation_id, attempt)]) == [""]
    assert int(await resolved(redis.hget(key, "lease_until_ms")) or 0) >= before
    busy = await store.start(session_id, generation_id)
    assert busy.outcome is StartOutcome.BUSY


# --- write


async def test_write_appends_events_text_and_offsets(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "ab"))]
    )
    (more,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, [delta(session_id, generation_id, 3, "日本🎉")])]
    )
    assert result.outcome is WriteOutcome.OK
    assert (more.outcome, more.last_seq, more.status) == (WriteOutcome.OK, 3, "running")
    keys = SessionKeys(session_id)
    entries = await redis.xrange(keys.events)
    assert len(entries) == 3
    raw_epoch, _ = await store.tail(session_id)
    assert raw_epoch
    epoch = raw_epoch.decode()
    bodies = [json.loads(fields[b"d"]) for _, fields in entries]
    assert [body["seq"] for body in bodies] == [1, 2, 3]
    assert [body["content"] for body in bodies] == ["a", "b", "日本🎉"]
    assert all(fields[b"e"] == epoch.encode() for _, fields in entries)
    ids = [StreamId.parse(entry_id) for entry_id, _ in entries]
    assert ids == sorted(ids)
    assert result.last_offset == Offset(epoch, ids[1])
    assert more.last_offset == Offset(epoch, ids[2])
    assert await redis.get(keys.generation_text(generation_id)) == "ab日本🎉".encode()
    record = await store.generation(generation_id)
    assert record is not None
    assert record.text == "ab日本🎉"
    assert record.status is GenerationStatus.RUNNING
    assert record.first_offset == f"{epoch}:{ids[0]}"
    assert record.last_offset == f"{epoch}:{ids[2]}"
    assert await store.tail(session_id) == (epoch.encode(), ids[2])


async def test_a_retried_write_stores_each_event_once(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    item = WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "abc"))
    (first,) = await store.write([item])
    (retried,) = await store.write([item])
    assert first.outcome is WriteOutcome.OK
    assert retried.outcome is WriteOutcome.OK
    assert retried.last_seq == 3
    assert retried.last_offset == first.last_offset
    # A retry overlapping what is stored, with one new event at its end.
    overlap = WriteItem(
        session_id, generation_id, attempt, deltas(session_id, generation_id, "bcd", first_seq=2)
    )
    (extended,) = await store.write([overlap])
    assert extended.last_seq == 4
    assert await stream_texts(redis, session_id) == ["a", "b", "c", "d"]
    assert await redis.get(SessionKeys(session_id).generation_text(generation_id)) == b"abcd"


async def test_a_seq_gap_stops_the_write(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    events = [delta(session_id, generation_id, 1, "a"), delta(session_id, generation_id, 3, "c")]
    events.append(delta(session_id, generation_id, 4, "d"))
    (result,) = await store.write([WriteItem(session_id, generation_id, attempt, events)])
    assert result.outcome is WriteOutcome.GAP
    assert result.last_seq == 1
    assert await stream_texts(redis, session_id) == ["a"]
    assert await redis.get(SessionKeys(session_id).generation_text(generation_id)) == b"a"
    (repaired,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "bcd", first_seq=2))]
    )
    assert (repaired.outcome, repaired.last_seq) == (WriteOutcome.OK, 4)


async def test_a_stale_attempt_is_fenced(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    await store.write(
        [WriteItem(session_id, generation_id, attempt, [delta(session_id, generation_id, 1, "a")])]
    )
    await store.release_lease(session_id, generation_id, attempt)
    takeover = await store.start(session_id, generation_id)
    assert takeover.attempt == attempt + 1
    stale = WriteItem(
        session_id, generation_id, attempt, deltas(session_id, generation_id, "bc", first_seq=2)
    )
    (result,) = await store.write([stale])
    assert result.outcome is WriteOutcome.FENCED
    assert result.last_seq == 1
    assert result.last_offset is None
    stale_finish = WriteItem(
        session_id, generation_id, attempt, [], Finish(GenerationStatus.FAILED, None, None, {"type": "x"})
    )
    (refused,) = await store.write([stale_finish])
    assert refused.outcome is WriteOutcome.FENCED
    assert await stream_texts(redis, session_id) == ["a"]
    assert await redis.get(SessionKeys(session_id).generation_text(generation_id)) == b"a"
    record = await store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.RUNNING


async def test_appending_before_start_is_fenced(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id = await accept(store, session_id)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, 0, deltas(session_id, generation_id, "a"))]
    )
    assert result.outcome is WriteOutcome.FENCED
    assert await redis.exists(SessionKeys(session_id).events) == 0


async def test_finish_completes_and_hands_over_to_the_next(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    next_id = await accept(store, session_id)
    events = [*deltas(session_id, generation_id, "hi"), completed(session_id, generation_id, 3, "hi")]
    finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
    item = WriteItem(session_id, generation_id, attempt, events, finish)
    (result,) = await store.write([item])
    assert result.outcome is WriteOutcome.OK
    assert result.status == "completed"
    assert result.next_generation_id == next_id
    assert result.last_seq == 3
    assert await queue_of(redis, session_id) == [next_id]
    record = await store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.COMPLETED
    assert record.finish_reason == "stop"
    assert record.usage == USAGE
    assert record.error is None
    assert record.text == "hi"
    assert record.finished_ms is not None
    ids = await stream_ids(redis, session_id)
    assert result.last_offset is not None
    assert result.last_offset.stream_id == ids[-1]
    # The same finish again, as after a connection lost mid-call: it already happened.
    (retried,) = await store.write([item])
    assert retried.outcome is WriteOutcome.OK
    assert retried.status == "completed"
    assert retried.next_generation_id == next_id
    assert await stream_ids(redis, session_id) == ids
    assert await queue_of(redis, session_id) == [next_id]
    for key in (SessionKeys(session_id).events, SessionKeys(session_id).generation_text(generation_id)):
        assert 0 < await resolved(redis.ttl(key)) <= 3600


async def test_failure_is_recorded_with_its_error(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    error = {"type": "upstream_timeout", "message": "stalled"}
    body = event_body(
        EventType.GENERATION_FAILED, session_id=session_id, generation_id=generation_id, seq=1, error=error
    )
    item = WriteItem(
        session_id,
        generation_id,
        attempt,
        [EventWrite(1, encode_body(body))],
        Finish(GenerationStatus.FAILED, None, None, error),
    )
    (result,) = await store.write([item])
    assert (result.outcome, result.status, result.next_generation_id) == (WriteOutcome.OK, "failed", None)
    record = await store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.FAILED
    assert record.error == error
    assert record.usage is None
    assert record.finish_reason is None


async def test_cancelling_a_queued_generation(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    first, _ = await running(store, session_id)
    queued = await accept(store, session_id)
    body = event_body(EventType.GENERATION_CANCELLED, session_id=session_id, generation_id=queued, seq=1)
    item = WriteItem(
        session_id, queued, 0, [EventWrite(1, encode_body(body))], Finish(GenerationStatus.CANCELLED)
    )
    (result,) = await store.write([item])
    assert (result.outcome, result.status) == (WriteOutcome.OK, "cancelled")
    assert result.next_generation_id == first
    assert await queue_of(redis, session_id) == [first]
    assert (await store.start(session_id, queued)).outcome is StartOutcome.TERMINAL


async def test_a_cancel_request_comes_back_with_each_write(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    (before,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "a"))]
    )
    assert before.cancel_requested == ""
    key = SessionKeys(session_id).generation(generation_id)
    await resolved(redis.hset(key, GenerationField.CANCEL_REQUESTED, "user"))
    (after,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, [delta(session_id, generation_id, 2, "b")])]
    )
    assert after.outcome is WriteOutcome.OK
    assert after.cancel_requested == "user"
    record = await store.generation(generation_id)
    assert record is not None
    assert record.cancel_requested == "user"


async def test_one_write_carries_several_sessions(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    other = new_session_id()
    first, first_attempt = await running(store, session_id)
    second, second_attempt = await running(store, other)
    results = await store.write(
        [
            WriteItem(session_id, first, first_attempt, deltas(session_id, first, "abc")),
            WriteItem(other, second, second_attempt, deltas(other, second, "z")),
        ]
    )
    assert [(r.outcome, r.last_seq) for r in results] == [(WriteOutcome.OK, 3), (WriteOutcome.OK, 1)]
    assert await stream_texts(redis, session_id) == ["a", "b", "c"]
    assert await stream_texts(redis, other) == ["z"]
    for result, session in zip(results, (session_id, other), strict=True):
        assert result.last_offset is not None
        assert result.last_offset.stream_id == (await stream_ids(redis, session))[-1]


async def test_cluster_mode_groups_by_slot_and_keeps_the_order(redis: Redis, session_id: str) -> None:
    store = make_store(redis, cluster=True)
    other = new_session_id()
    # A third session in the first one's slot: one session runs one generation at a time.
    neighbour = next(
        f"{session_id}-n{n}"
        for n in itertools.count()
        if slot_of(f"{session_id}-n{n}") == slot_of(session_id)
    )
    first, attempt_1 = await running(store, session_id)
    second, attempt_2 = await running(store, other)
    third, attempt_3 = await running(store, neighbour)
    results = await store.write(
        [
            WriteItem(session_id, first, attempt_1, deltas(session_id, first, "abc")),
            WriteItem(other, second, attempt_2, deltas(other, second, "z")),
            WriteItem(neighbour, third, attempt_3, deltas(neighbour, third, "pq")),
        ]
    )
    assert [(r.outcome, r.last_seq) for r in results] == [
        (WriteOutcome.OK, 3),
        (WriteOutcome.OK, 1),
        (WriteOutcome.OK, 2),
    ]
    assert await stream_texts(redis, session_id) == ["a", "b", "c"]
    assert await stream_texts(redis, neighbour) == ["p", "q"]
    assert await stream_texts(redis, other) == ["z"]


# --- resume


async def write_texts(store: Store, session_id: str, texts: str) -> tuple[str, list[StreamId]]:
    generation_id, attempt = await running(store, session_id)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, texts))]
    )
    assert result.outcome is WriteOutcome.OK
    assert result.last_offset is not None
    return result.last_offset.epoch, await stream_ids(store.redis, session_id)


async def after_millisecond(redis: Redis, ms: int) -> None:
    """Return once the server's clock is past `ms`, so that its next entry id starts a new millisecond."""
    async with asyncio.timeout(5):
        while True:
            seconds, micros = await resolved(redis.time())
            if seconds * 1000 + micros // 1000 > ms:
                return


async def test_check_resume(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.check_resume(session_id, None) == StreamId.ZERO
    generation_id, attempt = await running(store, session_id)
    await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "ab"))]
    )
    await after_millisecond(redis, (await stream_ids(redis, session_id))[-1].ms)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "cd", first_seq=3))]
    )
    assert result.last_offset is not None
    epoch = result.last_offset.epoch
    ids = await stream_ids(redis, session_id)
    assert len(ids) == 4
    assert await store.check_resume(session_id, None) == StreamId.ZERO
    for stream_id in ids:
        assert await store.check_resume(session_id, Offset(epoch, stream_id)) == stream_id
    with pytest.raises(OffsetGone):
        await store.check_resume(session_id, Offset("other1", ids[1]))
    beyond = StreamId(ids[-1].ms, ids[-1].seq + 1)
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, beyond))
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, StreamId(ids[-1].ms + 10_000, 0)))
    between = StreamId(ids[1].ms, ids[1].seq + 1)  # the two writes fell in different milliseconds
    assert ids[1] < between < ids[2]
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, between))


async def test_an_offset_before_the_first_entry_of_an_untrimmed_stream_is_unknown(
    redis: Redis, session_id: str
) -> None:
    """Nothing was ever trimmed (the first entry's predecessor is 0-0), so an id below the first entry was
    never an entry: that is UnknownOffset (404), not OffsetGone (410, "rebuild from a snapshot")."""
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcd")
    before_first = StreamId(ids[0].ms - 1, 0)
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, before_first))


async def test_check_resume_on_a_session_that_never_existed(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    with pytest.raises(OffsetGone):
        await store.check_resume(session_id, Offset("abc", StreamId(1, 0)))


async def test_trimmed_offsets_are_gone(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcdefghij")
    await redis.xtrim(SessionKeys(session_id).events, maxlen=3, approximate=False)
    kept = await stream_ids(redis, session_id)
    assert kept == ids[-3:]
    for stream_id in ids[:6]:
        with pytest.raises(OffsetGone):
            await store.check_resume(session_id, Offset(epoch, stream_id))
        with pytest.raises(OffsetGone):
            await store.read_after(session_id, stream_id, 10)
    # Reading from the very start serves what is retained (that is how a fresh subscriber begins).
    assert [entry.stream_id for entry in await store.read_after(session_id, StreamId.ZERO, 10)] == ids[-3:]
    assert await store.check_resume(session_id, Offset(epoch, ids[7])) == ids[7]
    # Reading on from the newest trimmed entry misses nothing: the next entry is retained.
    after = await store.read_after(session_id, ids[6], 10)
    assert [entry.stream_id for entry in after] == ids[7:]


async def test_resuming_at_the_newest_trimmed_entry(redis: Redis, session_id: str) -> None:
    """A subscriber whose last event was the last one trimmed has missed nothing: every event after it is
    still retained (read_after serves them), so check_resume must let it resume there. It must not answer
    UnknownOffset ("no event of this session has this offset"): the session did have that event."""
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcdefghij")
    await redis.xtrim(SessionKeys(session_id).events, maxlen=3, approximate=False)
    newest_trimmed = ids[6]
    assert [entry.stream_id for entry in await store.read_after(session_id, newest_trimmed, 10)] == ids[7:]
    assert await store.check_resume(session_id, Offset(epoch, newest_trimmed)) == newest_trimmed


async def test_approximate_trimming_makes_old_offsets_gone(redis: Redis, session_id: str) -> None:
    store = make_store(redis, stream_max_length=10)
    generation_id, attempt = await running(store, session_id)
    events = [delta(session_id, generation_id, seq, "t") for seq in range(1, 301)]
    (result,) = await store.write([WriteItem(session_id, generation_id, attempt, events)])
    assert (result.outcome, result.last_seq) == (WriteOutcome.OK, 300)
    assert result.last_offset is not None
    epoch = result.last_offset.epoch
    kept = await stream_ids(redis, session_id)
    assert len(kept) < 300
    assert kept[-1] == result.last_offset.stream_id
    record = await store.generation(generation_id)
    assert record is not None
    assert record.first_offset is not None
    first = Offset(epoch, StreamId.parse(record.first_offset.split(":")[1]))
    with pytest.raises(OffsetGone):
        await store.check_resume(session_id, first)
    assert await store.check_resume(session_id, Offset(epoch, kept[-1])) == kept[-1]
    assert record.text == "t" * 300  # the text snapshot is never trimmed


async def test_read_after_pages(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcdefg")
    pages = []
    after = StreamId.ZERO
    while True:
        page = await store.read_after(session_id, after, 3)
        if not page:
            break
        pages.append(page)
        after = page[-1].stream_id
    assert [len(page) for page in pages] == [3, 3, 1]
    entries = [entry for page in pages for entry in page]
    assert [entry.stream_id for entry in entries] == ids
    frames = [json.loads(entry.frame()) for entry in entries]
    assert [frame["content"] for frame in frames] == list("abcdefg")
    assert [frame["offset"] for frame in frames] == [f"{epoch}:{stream_id}" for stream_id in ids]
    assert all(entry.epoch == epoch.encode() for entry in entries)
    assert await store.read_after(session_id, ids[-1], 3) == []
    assert await store.read_after(new_session_id(), StreamId.ZERO, 3) == []


async def test_snapshot(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.snapshot(session_id) is None
    first, attempt = await running(store, session_id)
    second = await accept(store, session_id)
    events = [*deltas(session_id, first, "done"), completed(session_id, first, 5, "done")]
    finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
    await store.write([WriteItem(session_id, first, attempt, events, finish)])
    started = await store.start(session_id, second)
    await store.write([WriteItem(session_id, second, started.attempt, deltas(session_id, second, "par"))])
    snapshot = await store.snapshot(session_id)
    assert snapshot is not None
    assert snapshot.session_id == session_id
    assert [record.generation_id for record in snapshot.generations] == [first, second]
    assert [record.text for record in snapshot.generations] == ["done", "par"]
    assert [record.status for record in snapshot.generations] == [
        GenerationStatus.COMPLETED,
        GenerationStatus.RUNNING,
    ]
    assert snapshot.generations[0].usage == USAGE
    ids = await stream_ids(redis, session_id)
    epoch, last = await store.tail(session_id)
    assert epoch is not None
    assert snapshot.offset == Offset(epoch.decode(), ids[-1])
    assert last == ids[-1]


async def test_snapshot_before_any_event(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id = await accept(store, session_id)
    snapshot = await store.snapshot(session_id)
    assert snapshot is not None
    assert snapshot.offset is None
    assert [(r.generation_id, r.status, r.text) for r in snapshot.generations] == [
        (generation_id, GenerationStatus.QUEUED, "")
    ]


async def test_tail(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.tail(session_id) == (None, StreamId.ZERO)
    quiet = new_session_id()
    accepted = await store.accept(quiet, new_generation_id(), request=REQUEST, model="m")
    assert await store.tail(quiet) == (accepted.epoch.encode(), StreamId.ZERO)  # accepted, nothing written
    epoch, ids = await write_texts(store, session_id, "xy")
    assert await store.tail(session_id) == (epoch.encode(), ids[-1])


async def test_unknown_generation_has_no_record(redis: Redis) -> None:
    store = make_store(redis)
    assert await store.generation(new_generation_id()) is None
    assert await store.session_of(new_generation_id()) is None


# --- pub/sub


async def test_each_append_is_published_with_its_predecessor(
    redis: Redis, redis_server: EmbeddedRedis, session_id: str
) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    subscriber = Redis.from_url(redis_server.url)
    pubsub = subscriber.pubsub()
    try:
        await pubsub.subscribe(SessionKeys(session_id).live)
        async with asyncio.timeout(10):
            confirmation = await pubsub.get_message(timeout=10)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"
        one = [delta(session_id, generation_id, 1, "a")]
        two = deltas(session_id, generation_id, "bc", first_seq=2)
        await store.write([WriteItem(session_id, generation_id, attempt, one)])
        await store.write([WriteItem(session_id, generation_id, attempt, two)])
        messages: list[bytes] = []
        async with asyncio.timeout(10):
            while len(messages) < 3:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
                if message is not None:
                    messages.append(message["data"])
    finally:
        await pubsub.aclose()
        await subscriber.aclose()
    epoch, _ = await store.tail(session_id)
    assert epoch is not None
    ids = [str(stream_id).encode() for stream_id in await stream_ids(redis, session_id)]
    bodies = [event.body.encode() for event in one + two]
    expected_prev = [b"0-0", ids[0], ids[1]]  # a fresh session's stream starts after 0-0
    assert messages == [
        b" ".join([epoch, prev, entry_id, body])
        for prev, entry_id, body in zip(expected_prev, ids, bodies, strict=True)
    ]
    for message in messages:
        parts = message.split(b" ", 3)
        assert json.loads(parts[3])["session_id"] == session_id


def test_the_in_progress_prefix_is_arqs_own() -> None:
    """The worker shortens arq's claim on a job by its key's name: a rename in arq must not go unnoticed."""
    assert in_progress_key_prefix == ARQ_IN_PROGRESS_PREFIX
