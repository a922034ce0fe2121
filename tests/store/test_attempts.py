"""Taking a generation for an attempt, and the lease that proves the attempt alive (fencing)."""

from __future__ import annotations

from redis.asyncio import Redis

from tests.store.helpers import (
    REQUEST,
    USAGE,
    accept,
    completed,
    deltas,
    make_store,
    resolved,
    running,
    start_after_lease,
)
from tests.support.requests import new_session_id
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import GenerationField, SessionKeys
from tokenfan.store import Finish, StartOutcome, WriteItem, WriteOutcome


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
