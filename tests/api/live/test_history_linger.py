"""A storm's resumers arrive over tens of milliseconds: the feed keeps its catch-up history a moment after the
last resumer caught up, so a latecomer is served from memory instead of reading the backlog again, and the
history gives its budget back once the moment has passed."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from api.live.feed import LiveBus
from api.live.subscriber import Subscriber
from tests.api.live.test_history_budget import GatedBatchSink, seqs
from tests.api.live.test_subscriber import write_deltas
from tests.support.requests import new_session_id
from tests.support.waiting import wait_for_condition
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.offsets import StreamId
from tokenfan.store import Store
from tokenfan.store.tail import LiveTail

ENTRIES = 40


def count_reads(store: Store) -> list[str]:
    """Every page read from Redis for catching up, forwards or backwards, as it is read."""
    reads: list[str] = []
    read_after, read_before = store.read_after, store.read_before

    async def counted_after(session_id: str, after: StreamId, count: int) -> Any:
        reads.append("after")
        return await read_after(session_id, after, count)

    async def counted_before(session_id: str, through: StreamId, count: int) -> Any:
        reads.append("before")
        return await read_before(session_id, through, count)

    store.read_after, store.read_before = counted_after, counted_before  # type: ignore[method-assign,assignment]
    return reads


async def resume_from_start(bus: LiveBus, session_id: str) -> tuple[Subscriber, GatedBatchSink]:
    released = asyncio.Event()
    released.set()
    sink = GatedBatchSink(released)
    subscriber = Subscriber(
        bus, session_id, StreamId.ZERO, sink, max_buffer_bytes=1 << 20, slow_policy="close", merge=True
    )
    subscriber.start()
    async with asyncio.timeout(10):
        await subscriber.caught_up.wait()
    return subscriber, sink


async def test_a_resumer_arriving_after_the_others_caught_up_is_served_from_the_history(
    redis: Redis,
) -> None:
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    bus = LiveBus(store, LiveTail(store.topology), page_size=4, history_linger_seconds=1.0)
    bus.start()
    session_id, generation_id = new_session_id(), new_generation_id()
    await store.accept(session_id, generation_id, request={"model": "m", "messages": []}, model="m")
    attempt = (await store.start(session_id, generation_id)).attempt
    await write_deltas(store, session_id, generation_id, attempt, range(1, ENTRIES + 1))
    reads = count_reads(store)
    subscribers = []
    try:
        first, first_sink = await resume_from_start(bus, session_id)
        subscribers.append(first)
        assert set(reads) == {"before"}  # the history was read back, page by page
        read_for_the_first = len(reads)
        assert bus.history_budget.held > 0  # the first resumer caught up; its history stays a moment

        late, late_sink = await resume_from_start(bus, session_id)
        subscribers.append(late)
        assert len(reads) == read_for_the_first  # nothing read again
        assert seqs(first_sink.frames) == seqs(late_sink.frames) == list(range(1, ENTRIES + 1))

        # Once nobody has caught up for the moment, the history is dropped and its budget given back.
        async def dropped() -> bool:
            return bus.history_budget.held == 0

        await wait_for_condition(dropped, timeout=10)
        again, again_sink = await resume_from_start(bus, session_id)
        subscribers.append(again)
        assert len(reads) > read_for_the_first  # read back anew
        assert seqs(again_sink.frames) == list(range(1, ENTRIES + 1))

    finally:
        for subscriber in subscribers:
            await subscriber.stop()
        await bus.close()
        await store.topology.close()
