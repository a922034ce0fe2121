"""Many sessions resuming at once under a small catch-up history budget, over a real Valkey and a real live
tail: every resumer still gets exactly its stream (no gap, no duplicate, then the live tail), the histories
together never hold more than the budget, and they give it all back once nobody catches up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from api.live.feed import LiveBus
from api.live.frames import FrameBatch
from api.live.history import entry_cost
from api.live.subscriber import Subscriber
from tests.api.live.test_subscriber import GatedSink, write_deltas
from tests.support.requests import new_session_id
from tests.support.waiting import wait_for_condition
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.offsets import StreamId
from tokenfan.store import Store
from tokenfan.store.tail import LiveTail

ENTRIES = 40
MORE = 6  # appended while the resumers are held: the histories follow the feed, over the budget
STARTS = [30, 3, 17, 29, 10, 0, 36]  # resume after the start-th entry (0: from the beginning)


class GatedBatchSink(GatedSink):
    """A `BatchSink` (the relay's kind): pages the history holds reach it several at once."""

    async def send_batches(self, batches: list[FrameBatch]) -> None:
        for frame in (frame for batch in batches for frame in batch.frames):
            await self.send(frame)


@dataclass
class Session:
    """One session's stream of deltas (seq n is its n-th entry) and its resumers."""

    store: Store
    session_id: str = field(default_factory=new_session_id)
    generation_id: str = field(default_factory=new_generation_id)
    attempt: int = 0
    resumers: list[tuple[int, GatedSink, Subscriber]] = field(default_factory=list)

    async def write(self, seqs: range) -> None:
        if not self.attempt:
            request = {"model": "m", "messages": []}
            await self.store.accept(self.session_id, self.generation_id, request=request, model="m")
            self.attempt = (await self.store.start(self.session_id, self.generation_id)).attempt
        await write_deltas(self.store, self.session_id, self.generation_id, self.attempt, seqs)

    async def ids(self, redis: Redis) -> list[StreamId]:
        return [StreamId.parse(entry) for entry, _ in await redis.xrange(f"tf:{{{self.session_id}}}:events")]

    async def resume(self, bus: LiveBus, redis: Redis, release: asyncio.Event, *, merge: bool) -> None:
        """A resumer after each of `STARTS`, each held at its first send until `release`."""
        ids = await self.ids(redis)
        for start in STARTS:
            sink = GatedBatchSink(release) if merge else GatedSink(release)
            after = ids[start - 1] if start else StreamId.ZERO
            subscriber = Subscriber(
                bus, self.session_id, after, sink, max_buffer_bytes=1 << 20, slow_policy="close", merge=merge
            )
            self.resumers.append((start, sink, subscriber))
            subscriber.start()

    async def stop(self) -> None:
        for *_, subscriber in self.resumers:
            await subscriber.stop()

    async def last_arrives(self, seq: int) -> None:
        for _, sink, _ in self.resumers:
            while seqs(sink.frames)[-1] != seq:
                sink.arrived.clear()
                await sink.arrived.wait()

    def assert_exact(self, last: int) -> None:
        for start, sink, _ in self.resumers:
            assert seqs(sink.frames) == list(range(start + 1, last + 1))


def fed(bus: LiveBus, redis: Redis, sessions: list[Session]) -> Callable[[], Awaitable[bool]]:
    """Whether every session's feed has delivered its stream's last entry (into its history)."""

    async def check() -> bool:
        for session in sessions:
            last = (await session.ids(redis))[-1]
            if bus.feeds[session.session_id].position != last:
                return False
        return True

    return check


def count_forward_reads(store: Store) -> list[int]:
    """The pages resumers read for themselves (`Store.read_after`), as they are read."""
    forwards: list[int] = []
    read_after = store.read_after

    async def counted(session_id: str, after: StreamId, count: int) -> Any:
        forwards.append(count)
        return await read_after(session_id, after, count)

    store.read_after = counted  # type: ignore[method-assign,assignment]
    return forwards


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    """The seqs the frames carry, in order (a merged delta covers seq_start..seq)."""
    return [seq for frame in frames for seq in range(frame.get("seq_start", frame["seq"]), frame["seq"] + 1)]


@pytest.mark.parametrize("merge", [True, False], ids=["batches", "frames"])
async def test_many_sessions_resuming_at_once_get_exactly_their_streams_within_the_budget(
    redis: Redis, merge: bool
) -> None:
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    sessions = [Session(store) for _ in range(5)]
    for session in sessions:
        await session.write(range(1, ENTRIES + 1))
    # Room for about 25 entries in all, where each session's resumers would want 40 held: the histories run
    # into the budget, grow back no further, and the resumers behind them read pages of their own.
    first = (await store.read_after(sessions[0].session_id, StreamId.ZERO, 1))[0]
    bus = LiveBus(
        store,
        LiveTail(store.topology),
        page_size=4,
        history_budget=25 * entry_cost(first),
        history_linger_seconds=0.1,
    )
    bus.start()
    forwards = count_forward_reads(store)
    release = asyncio.Event()
    try:
        async with asyncio.timeout(20):
            for session in sessions:
                await session.resume(bus, redis, release, merge=merge)
            for session in sessions:  # every resumer has its first page: all catch up at once
                await asyncio.gather(*(sink.waiting.wait() for _, sink, _ in session.resumers))
                await session.write(range(ENTRIES + 1, ENTRIES + MORE + 1))
            await wait_for_condition(fed(bus, redis, sessions))
            release.set()
            for session in sessions:
                await asyncio.gather(*(subscriber.caught_up.wait() for *_, subscriber in session.resumers))
        for session in sessions:
            session.assert_exact(ENTRIES + MORE)
        assert 0 < bus.history_budget.peak <= bus.history_budget.limit
        assert forwards  # the budget ran out: some resumers read their own pages

        async def dropped() -> bool:  # nobody catches up: every history is dropped a moment later
            return bus.history_budget.held == 0

        await wait_for_condition(dropped)
        async with asyncio.timeout(10):
            for session in sessions:  # then the live tail
                await session.write(range(ENTRIES + MORE + 1, ENTRIES + MORE + 2))
                await session.last_arrives(ENTRIES + MORE + 1)
        for session in sessions:
            session.assert_exact(ENTRIES + MORE + 1)
    finally:
        for session in sessions:
            await session.stop()
        await bus.close()
        await store.topology.close()


async def test_resumers_the_history_cannot_serve_share_the_pages_read_from_before_their_offsets(
    redis: Redis,
) -> None:
    """With no room in the budget at all, every resumer reads pages from Redis; one already being read from
    before a resumer's offset serves it too (what follows its offset in that page), so seven resumers at
    seven offsets read fewer than seven pages, and each still gets exactly its stream."""
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    session = Session(store)
    await session.write(range(1, ENTRIES + 1))
    bus = LiveBus(store, LiveTail(store.topology), page_size=64, history_budget=1)
    bus.start()
    forwards = count_forward_reads(store)
    release = asyncio.Event()
    try:
        async with asyncio.timeout(20):
            await session.resume(bus, redis, release, merge=True)
            await asyncio.gather(*(sink.waiting.wait() for _, sink, _ in session.resumers))
            release.set()
            await asyncio.gather(*(subscriber.caught_up.wait() for *_, subscriber in session.resumers))
        session.assert_exact(ENTRIES)
        assert 0 < len(forwards) < len(STARTS)
        assert bus.history_budget.peak == 0
    finally:
        await session.stop()
        await bus.close()
        await store.topology.close()
