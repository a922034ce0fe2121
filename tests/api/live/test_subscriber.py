"""The subscriber driver over a real Valkey and a real live tail: catch-up merges a backlog unless told not to,
and a subscriber says when it has caught up and joined the feed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from api.live.feed import LiveBus
from api.live.frames import FrameBatch
from api.live.subscriber import SLOW_CONSUMER_CLOSE_CODE, Subscriber
from tests.support.requests import new_session_id
from tokenfan.contract.events import EventType, encode_body, event_body
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.offsets import StreamId
from tokenfan.store import EventWrite, Store, WriteItem
from tokenfan.store.tail import LiveTail


class RecordingSink:
    """Records what a subscriber hands over: catch-up frames, and live batches entry by entry."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.live_entries = 0
        self.arrived = asyncio.Event()

    def deliver(self, batch: FrameBatch) -> None:
        self.live_entries += len(batch.entries)
        self.frames += [json.loads(entry.frame()) for entry in batch.entries]
        self.arrived.set()

    async def send(self, frame: bytes) -> None:
        self.frames.append(json.loads(frame))

    def buffered(self) -> int:
        return 0

    async def drained(self) -> None:
        return None

    def end(self, code: int, reason: str) -> None:
        raise AssertionError(f"the subscription ended: {code} {reason}")


@pytest.fixture
async def bus(redis: Redis) -> AsyncIterator[LiveBus]:
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    bus = LiveBus(store, LiveTail(store.topology))
    bus.start()
    yield bus
    await bus.close()
    await store.topology.close()


async def write_deltas(store: Store, session_id: str, generation_id: str, attempt: int, seqs: range) -> None:
    for seq in seqs:  # one write each: one stream entry each
        body = event_body(
            EventType.DELTA, session_id=session_id, generation_id=generation_id, seq=seq, content="x"
        )
        await store.write(
            [WriteItem(session_id, generation_id, attempt, [EventWrite(seq, encode_body(body), "x")])]
        )


@pytest.mark.parametrize("merge", [True, False])
async def test_catch_up_merges_a_backlog_only_when_allowed_then_goes_live(bus: LiveBus, merge: bool) -> None:
    store, session_id, generation_id = bus.store, new_session_id(), new_generation_id()
    await store.accept(session_id, generation_id, request={"model": "m", "messages": []}, model="m")
    attempt = (await store.start(session_id, generation_id)).attempt
    await write_deltas(store, session_id, generation_id, attempt, range(1, 6))
    sink = RecordingSink()
    subscriber = Subscriber(
        bus, session_id, StreamId.ZERO, sink, max_buffer_bytes=1 << 20, slow_policy="close", merge=merge
    )
    subscriber.start()
    try:
        async with asyncio.timeout(10):
            await subscriber.caught_up.wait()
        caught_up = [(frame.get("seq_start", frame["seq"]), frame["seq"]) for frame in sink.frames]
        assert caught_up == ([(1, 5)] if merge else [(n, n) for n in range(1, 6)])
        await write_deltas(store, session_id, generation_id, attempt, range(6, 7))
        async with asyncio.timeout(10):
            await sink.arrived.wait()
        assert sink.live_entries == 1
        assert sink.frames[-1]["seq"] == 6
    finally:
        await subscriber.stop()


class GatedSink(RecordingSink):
    """Holds its first catch-up send until `release` is set, so subscribers overlap while catching up."""

    def __init__(self, release: asyncio.Event) -> None:
        super().__init__()
        self.release = release
        self.waiting = asyncio.Event()

    async def send(self, frame: bytes) -> None:
        self.waiting.set()
        await self.release.wait()
        await super().send(frame)


async def test_resumers_at_different_offsets_read_each_entry_from_redis_once(redis: Redis) -> None:
    """A storm of reconnects: resumers at many offsets catching up at once share the feed's history, so the
    entries they need are read from Redis once (not once per resumer), and each still gets exactly what
    follows its offset, then the live tail."""
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    bus = LiveBus(store, LiveTail(store.topology), page_size=4)
    bus.start()
    read: list[int] = []
    read_after, read_before = store.read_after, store.read_before

    async def counted_after(session_id: str, after: StreamId, count: int) -> Any:
        page = await read_after(session_id, after, count)
        read.append(len(page))
        return page

    async def counted_before(session_id: str, through: StreamId, count: int) -> Any:
        run, predecessor = await read_before(session_id, through, count)
        read.append(len(run))
        return run, predecessor

    store.read_after, store.read_before = counted_after, counted_before  # type: ignore[method-assign,assignment]
    session_id, generation_id = new_session_id(), new_generation_id()
    await store.accept(session_id, generation_id, request={"model": "m", "messages": []}, model="m")
    attempt = (await store.start(session_id, generation_id)).attempt
    await write_deltas(store, session_id, generation_id, attempt, range(1, 41))
    ids = [StreamId.parse(entry_id) for entry_id, _ in await redis.xrange(f"tf:{{{session_id}}}:events")]
    release = asyncio.Event()
    starts = [30, 3, 17, 29, 10, 0]  # resume after the start-th entry (0: from the beginning)
    sinks = [GatedSink(release) for _ in starts]
    subscribers = [
        Subscriber(bus, session_id, ids[start - 1] if start else StreamId.ZERO, sink,
                   max_buffer_bytes=1 << 20, slow_policy="close", merge=False)
        for start, sink in zip(starts, sinks, strict=True)
    ]  # fmt: skip
    try:
        for subscriber in subscribers:
            subscriber.start()
        async with asyncio.timeout(10):
            for sink in sinks:
                await sink.waiting.wait()
            release.set()
            for subscriber in subscribers:
                await subscriber.caught_up.wait()
        assert sum(read) <= 40 + 4  # each entry once (the last read may reach past the first entry)
        for start, sink in zip(starts, sinks, strict=True):
            assert [frame["seq"] for frame in sink.frames] == list(range(start + 1, 41))
        await write_deltas(store, session_id, generation_id, attempt, range(41, 42))
        async with asyncio.timeout(10):
            for sink in sinks:
                while sink.frames[-1]["seq"] != 41:
                    sink.arrived.clear()
                    await sink.arrived.wait()
    finally:
        for subscriber in subscribers:
            await subscriber.stop()
        await bus.close()
        await store.topology.close()


class StallingSink(RecordingSink):
    """A client that stops reading when told: its buffered bytes then stand past any limit. Records its end."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False
        self.ended: tuple[int, str] | None = None

    def buffered(self) -> int:
        return 1 << 30 if self.stalled else 0

    def end(self, code: int, reason: str) -> None:
        self.ended = (code, reason)


async def until_seq(sink: RecordingSink, seq: int) -> None:
    while sink.frames[-1]["seq"] != seq:
        sink.arrived.clear()
        await sink.arrived.wait()


async def test_a_live_subscriber_that_stops_reading_is_ended_while_the_others_get_every_entry(
    bus: LiveBus,
) -> None:
    """Live subscribers of one session, all in step with its feed: the one whose client stops reading gets the
    slow policy at the next batch (close: 4008) and nothing more, and the others go on getting every entry,
    in order, once."""
    store, session_id, generation_id = bus.store, new_session_id(), new_generation_id()
    await store.accept(session_id, generation_id, request={"model": "m", "messages": []}, model="m")
    attempt = (await store.start(session_id, generation_id)).attempt
    await write_deltas(store, session_id, generation_id, attempt, range(1, 3))
    sinks = [StallingSink() for _ in range(3)]
    subscribers = [
        Subscriber(
            bus, session_id, StreamId.ZERO, sink, max_buffer_bytes=1 << 20, slow_policy="close", merge=False
        )
        for sink in sinks
    ]
    try:
        for subscriber in subscribers:
            subscriber.start()
        async with asyncio.timeout(10):
            for subscriber in subscribers:
                await subscriber.caught_up.wait()
        await write_deltas(store, session_id, generation_id, attempt, range(3, 5))  # live, every one in step
        async with asyncio.timeout(10):
            for sink in sinks:
                await until_seq(sink, 4)
        sinks[1].stalled = True
        await write_deltas(store, session_id, generation_id, attempt, range(5, 8))
        async with asyncio.timeout(10):
            for sink in (sinks[0], sinks[2]):
                await until_seq(sink, 7)
        for sink in (sinks[0], sinks[2]):
            assert [frame["seq"] for frame in sink.frames] == list(range(1, 8))
            assert sink.ended is None
        assert [frame["seq"] for frame in sinks[1].frames] == list(range(1, 5))
        assert sinks[1].ended is not None
        assert sinks[1].ended[0] == SLOW_CONSUMER_CLOSE_CODE
    finally:
        for subscriber in subscribers:
            await subscriber.stop()
