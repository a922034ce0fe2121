"""Snapshots: a session's generations consistent with an offset, however the session changes meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from tests.store.helpers import (
    REQUEST,
    USAGE,
    accept,
    completed,
    deltas,
    make_store,
    running,
    stream_ids,
)
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import Offset
from tokenfan.store import Finish, Store, WriteItem, WriteOutcome


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


async def finished_generation(store: Store, session_id: str, text: str) -> str:
    """Run a generation of the session to completion, one delta per character of `text`."""
    generation_id, attempt = await running(store, session_id)
    events = [
        *deltas(session_id, generation_id, text),
        completed(session_id, generation_id, len(text) + 1, text),
    ]
    finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
    (result,) = await store.write([WriteItem(session_id, generation_id, attempt, events, finish)])
    assert result.outcome is WriteOutcome.OK
    return generation_id


async def test_a_snapshot_after_an_offset_holds_what_changed_after_it(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    before = await finished_generation(store, session_id, "old")
    since = (await stream_ids(redis, session_id))[-1]
    after = await finished_generation(store, session_id, "new")
    live, attempt = await running(store, session_id)
    await store.write([WriteItem(session_id, live, attempt, deltas(session_id, live, "li"))])
    quiet = await accept(store, session_id)  # queued, nothing written: nothing changed for a subscriber
    snapshot = await store.snapshot(session_id, since=since)
    assert snapshot is not None
    assert [(r.generation_id, r.text) for r in snapshot.generations] == [(after, "new"), (live, "li")]
    assert before not in {r.generation_id for r in snapshot.generations}
    assert quiet not in {r.generation_id for r in snapshot.generations}
    newest = await store.snapshot(session_id, since=(await stream_ids(redis, session_id))[-1])
    assert newest is not None
    assert newest.generations == []


async def test_a_snapshot_after_an_offset_reaches_back_as_far_as_it_must(
    redis: Redis, session_id: str
) -> None:
    """Twenty generations changed after the offset: more than the few the store reads first."""
    store = make_store(redis)
    generations = [await finished_generation(store, session_id, f"{n}") for n in range(22)]
    ids = await stream_ids(redis, session_id)
    since = ids[3]  # the last entry of the second generation (each wrote a delta and its completion)
    snapshot = await store.snapshot(session_id, since=since)
    assert snapshot is not None
    assert [record.generation_id for record in snapshot.generations] == generations[2:]
    assert [record.text for record in snapshot.generations] == [f"{n}" for n in range(2, 22)]
    assert snapshot.offset is not None
    assert snapshot.offset.stream_id == ids[-1]


class _MeanwhileStore(Store):
    """A store that lets something happen right after a snapshot has read which generations there are,
    before its script runs: the instant another process's call can fall into."""

    def __init__(self, redis: Redis, meanwhile: Callable[[], Awaitable[None]]) -> None:
        super().__init__(redis, session_ttl_seconds=3600, stream_max_length=1000)
        self.meanwhile: Callable[[], Awaitable[None]] | None = meanwhile

    async def _newest_generations(self, keys: SessionKeys, window: int | None) -> list[str]:
        ids = await super()._newest_generations(keys, window)
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        return ids


async def test_a_generation_that_may_start_while_a_snapshot_is_taken_is_in_it(
    redis: Redis, session_id: str
) -> None:
    """Accepted into an idle session between the snapshot's read of the list and its script: it is the
    queue's head and may be running already, so the snapshot reads the list again and includes it."""
    store = make_store(redis)
    done = await finished_generation(store, session_id, "a")
    arriving = new_generation_id()

    async def accept_another() -> None:
        await store.accept(session_id, arriving, request=REQUEST, model="m")

    snapshot = await _MeanwhileStore(redis, accept_another).snapshot(session_id)
    assert snapshot is not None
    assert [record.generation_id for record in snapshot.generations] == [done, arriving]


async def test_a_generation_queued_while_a_snapshot_is_taken_is_left_to_the_next(
    redis: Redis, session_id: str
) -> None:
    """Accepted behind a running generation meanwhile: it has no event yet, so the snapshot is the session
    as it was just before it arrived, and the next snapshot has it."""
    store = make_store(redis)
    head, _ = await running(store, session_id)
    arriving = new_generation_id()

    async def accept_another() -> None:
        await store.accept(session_id, arriving, request=REQUEST, model="m")

    snapshot = await _MeanwhileStore(redis, accept_another).snapshot(session_id)
    assert snapshot is not None
    assert [record.generation_id for record in snapshot.generations] == [head]
    later = await store.snapshot(session_id)
    assert later is not None
    assert [record.generation_id for record in later.generations] == [head, arriving]
    assert later.offset == snapshot.offset


async def test_a_snapshot_after_an_offset_includes_a_generation_that_started_meanwhile(
    redis: Redis, session_id: str
) -> None:
    store = make_store(redis)
    await finished_generation(store, session_id, "a")
    since = (await stream_ids(redis, session_id))[-1]
    first, attempt = await running(store, session_id)
    await store.write([WriteItem(session_id, first, attempt, deltas(session_id, first, "b"))])
    joined: list[str] = []

    async def finish_and_start_another() -> None:
        done = [completed(session_id, first, 2, "b")]
        finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
        await store.write([WriteItem(session_id, first, attempt, done, finish)])
        second, second_attempt = await running(store, session_id)
        await store.write([WriteItem(session_id, second, second_attempt, deltas(session_id, second, "c"))])
        joined.append(second)

    snapshot = await _MeanwhileStore(redis, finish_and_start_another).snapshot(session_id, since=since)
    assert snapshot is not None
    assert [(r.generation_id, r.status, r.text) for r in snapshot.generations] == [
        (first, GenerationStatus.COMPLETED, "b"),
        (joined[0], GenerationStatus.RUNNING, "c"),
    ]
    epoch, last = await store.tail(session_id)
    assert epoch is not None
    assert snapshot.offset == Offset(epoch.decode(), last)


async def test_snapshots_taken_while_generations_arrive_each_list_a_prefix(
    redis: Redis, session_id: str
) -> None:
    """Accepts and snapshots interleave on the wire: each snapshot lists the generations accepted before
    it, in order, and never a later one without all those before it."""
    store = make_store(redis)
    accepted = [new_generation_id() for _ in range(30)]

    async def accept_all() -> None:
        for generation_id in accepted:
            await store.accept(session_id, generation_id, request=REQUEST, model="m")

    async def snapshot_many() -> list[list[str]]:
        seen = []
        for _ in range(30):
            snapshot = await store.snapshot(session_id)
            seen.append([record.generation_id for record in snapshot.generations] if snapshot else [])
        return seen

    _, seen = await asyncio.gather(accept_all(), snapshot_many())
    for listed in seen:
        assert listed == accepted[: len(listed)]
    final = await store.snapshot(session_id)
    assert final is not None
    assert [record.generation_id for record in final.generations] == accepted
