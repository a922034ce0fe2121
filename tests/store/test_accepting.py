"""Accepting generations, finding them, asking them to cancel; and the shared rate limit."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from tests.store.helpers import REQUEST, USAGE, accept, completed, make_store, queue_of, resolved, running
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import SessionKeys
from tokenfan.store import AcceptOutcome, AcceptResult, Finish, Store, WriteItem, WriteOutcome


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


async def test_an_idempotency_key_with_another_request_is_refused_and_writes_nothing(
    redis: Redis, session_id: str
) -> None:
    store = make_store(redis)
    first = await store.accept(
        session_id, new_generation_id(), request=REQUEST, model="m", idempotency_key="k"
    )
    other_request = {**REQUEST, "temperature": 0.5}
    for request, policy in ((other_request, "enqueue"), (REQUEST, "interrupt")):
        reused = await store.accept(
            session_id, new_generation_id(), request=request, model="m", policy=policy, idempotency_key="k"
        )
        assert (reused.outcome, reused.generation_id) == (AcceptOutcome.REUSED, first.generation_id)
        assert reused.queue_position == 0
    # The same request with its members in another order is the same request.
    reordered = dict(reversed(list(REQUEST.items())))
    again = await store.accept(
        session_id, new_generation_id(), request=reordered, model="m", idempotency_key="k"
    )
    assert (again.outcome, again.generation_id) == (AcceptOutcome.DUPLICATE, first.generation_id)
    assert await queue_of(redis, session_id) == [first.generation_id]


async def test_replay_answers_a_known_key_without_writing(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.replay(session_id, "k", request=REQUEST) is None
    first = await store.accept(
        session_id, new_generation_id(), request=REQUEST, model="m", idempotency_key="k"
    )
    replayed = await store.replay(session_id, "k", request=REQUEST)
    assert replayed == AcceptResult(AcceptOutcome.DUPLICATE, first.generation_id, 1, first.epoch)
    reused = await store.replay(session_id, "k", request={**REQUEST, "model": "n"})
    assert reused is not None
    assert (reused.outcome, reused.generation_id) == (AcceptOutcome.REUSED, first.generation_id)
    assert await store.replay(session_id, "k", request=REQUEST, policy="reject") == AcceptResult(
        AcceptOutcome.REUSED, first.generation_id, 0, ""
    )
    assert await queue_of(redis, session_id) == [first.generation_id]


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


async def test_interrupt_cancels_the_head_and_runs_right_after_it(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    head, _ = await running(store, session_id)
    waiting = await accept(store, session_id)
    interrupting = new_generation_id()
    result = await store.accept(session_id, interrupting, request=REQUEST, model="m", policy="interrupt")
    assert (result.outcome, result.queue_position) == (AcceptOutcome.ACCEPTED, 2)
    assert await queue_of(redis, session_id) == [head, interrupting, waiting]
    interrupted, untouched = await store.generation(head), await store.generation(waiting)
    assert interrupted is not None
    assert interrupted.cancel_requested == "interrupted"
    assert untouched is not None
    assert untouched.cancel_requested is None


async def test_interrupt_on_an_idle_session_simply_runs(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id = new_generation_id()
    result = await store.accept(session_id, generation_id, request=REQUEST, model="m", policy="interrupt")
    assert (result.outcome, result.queue_position) == (AcceptOutcome.ACCEPTED, 1)
    assert await queue_of(redis, session_id) == [generation_id]


class _RacingStore(Store):
    """A store that lets something happen right after an interrupting accept has read its session's queue
    head, before its script runs: the instant another process's call can fall into."""

    def __init__(self, redis: Redis, between: Callable[[str], Awaitable[None]]) -> None:
        super().__init__(redis, session_ttl_seconds=3600, stream_max_length=1000)
        self.between: Callable[[str], Awaitable[None]] | None = between

    async def _queue_head(self, keys: SessionKeys) -> str:
        head = await super()._queue_head(keys)
        if self.between is not None:
            between, self.between = self.between, None
            await between(head)
        return head


async def test_an_interrupt_racing_the_heads_finish_interrupts_the_next_head(
    redis: Redis, session_id: str
) -> None:
    """The head the interrupt read finishes before the interrupt lands: the interrupt applies to the
    generation at the head now, and the new generation runs right after that one. (Had the store used
    the head it read, it would have flagged a finished generation and queued nothing behind it.)"""
    store = make_store(redis)
    first, attempt = await running(store, session_id)
    second = await accept(store, session_id)

    async def finish_first(head: str) -> None:
        assert head == first
        finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
        item = WriteItem(session_id, first, attempt, [completed(session_id, first, 1, "")], finish)
        (result,) = await store.write([item])
        assert (result.outcome, result.next_generation_id) == (WriteOutcome.OK, second)

    racing = _RacingStore(redis, finish_first)
    interrupting = new_generation_id()
    result = await racing.accept(session_id, interrupting, request=REQUEST, model="m", policy="interrupt")
    assert (result.outcome, result.queue_position) == (AcceptOutcome.ACCEPTED, 2)
    assert await queue_of(redis, session_id) == [second, interrupting]
    finished, interrupted = await store.generation(first), await store.generation(second)
    assert finished is not None
    assert (finished.status, finished.cancel_requested) == (GenerationStatus.COMPLETED, None)
    assert interrupted is not None
    assert interrupted.cancel_requested == "interrupted"


async def test_an_interrupt_racing_the_last_finish_runs_at_once(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    only, attempt = await running(store, session_id)

    async def finish_it(head: str) -> None:
        finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
        item = WriteItem(session_id, only, attempt, [completed(session_id, only, 1, "")], finish)
        await store.write([item])

    interrupting = new_generation_id()
    racing = _RacingStore(redis, finish_it)
    result = await racing.accept(session_id, interrupting, request=REQUEST, model="m", policy="interrupt")
    assert (result.outcome, result.queue_position) == (AcceptOutcome.ACCEPTED, 1)
    assert await queue_of(redis, session_id) == [interrupting]


async def test_request_cancel_flags_a_live_generation_once(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.request_cancel(session_id, new_generation_id(), "requested") is None
    generation_id = await accept(store, session_id)
    assert await store.is_queued(session_id, generation_id)
    assert await store.request_cancel(session_id, generation_id, "requested") is GenerationStatus.QUEUED
    assert await store.request_cancel(session_id, generation_id, "unwatched") is GenerationStatus.QUEUED
    record = await store.generation(generation_id)
    assert record is not None
    assert record.cancel_requested == "requested"  # the first reason stands


async def test_a_started_generation_is_no_longer_queued(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, _ = await running(store, session_id)
    assert not await store.is_queued(session_id, generation_id)
    assert await store.request_cancel(session_id, generation_id, "requested") is GenerationStatus.RUNNING


async def test_the_rate_limit_lets_a_burst_through_then_asks_to_wait(redis: Redis) -> None:
    store = make_store(redis)
    name = f"principal-{uuid.uuid4().hex}"
    burst = [await store.rate_limit(name, 60) for _ in range(6)]  # a tenth of a minute's worth
    assert burst == [0.0] * 6
    wait = await store.rate_limit(name, 60)
    assert 0 < wait <= 1.0
    assert await store.rate_limit(f"principal-{uuid.uuid4().hex}", 60) == 0.0  # another principal's own
    assert await store.rate_limit(name, 0) == 0.0  # 0: no limit


async def test_unknown_generation_has_no_record(redis: Redis) -> None:
    store = make_store(redis)
    assert await store.generation(new_generation_id()) is None
    assert await store.session_of(new_generation_id()) is None
