"""Reading a stream over the live engine: catch-up, long-poll and SSE, for Durable Streams and sessions alike.

A stream is read as a session is: the process's feed of it (`api.live.feed`) shares one Redis read among
the readers asking for the same page at the same time, and every long-poll and SSE reader is a `Subscriber`
over a sink of its own, so a thousand readers waiting on one stream cost one pub/sub message per append.
Their sinks take entries (`EntrySink`), not session frames: a `View` says what each entry's bytes and offset
are on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from api.http.ds.protocol import ZERO_OFFSET, control_event, data_event, encode_offset, response_cursor
from api.live.feed import LiveBus
from api.live.frames import FrameBatch
from api.live.subscriber import Subscriber
from tokenfan.contract.errors import OffsetGone
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

__all__ = ["LongPollSink", "Mode", "Read", "SseSink", "View", "catch_up", "long_poll", "sse_body"]


class Mode(Enum):
    JSON = "json"  # messages are JSON values; a read is one JSON array
    TEXT = "text"  # text/*: bytes, sent as text over SSE
    BYTES = "bytes"  # anything else: bytes, base64 over SSE


@dataclass(frozen=True, slots=True)
class View:
    """How one stream's entries look on the wire."""

    name: str  # the live engine's name of the stream (a session id, or ``ds:<path>``)
    path: str  # the stream's path, for ETags
    mode: Mode
    content_type: str
    session: bool = False  # a session: entries are events, offsets carry the epoch, nothing ever closes

    def data(self, entry: StreamEntry) -> bytes:
        return entry.frame() if self.session else entry.body

    def offset(self, entry: StreamEntry) -> str:
        return encode_offset(entry.stream_id, entry.epoch if self.session else None)

    def position(self, stream_id: StreamId, epoch: bytes | None) -> str:
        if stream_id == StreamId.ZERO:
            return ZERO_OFFSET
        return encode_offset(stream_id, epoch if self.session else None)

    def sse_payload(self, entry: StreamEntry) -> str:
        data = self.data(entry)
        if self.mode is Mode.JSON:
            return "[" + data.decode() + "]"
        if self.mode is Mode.TEXT:
            return data.decode("utf-8", "replace")
        return base64.b64encode(data).decode()


@dataclass(frozen=True, slots=True)
class Read:
    """What a read found: the messages (no close marker), whether the stream ends after them, and whether
    they reach the stream's end as it was."""

    entries: list[StreamEntry]
    closed: bool
    up_to_date: bool

    @classmethod
    def of(cls, page: list[StreamEntry], page_size: int) -> Read:
        data = [entry for entry in page if entry.body]
        return cls(data, len(data) < len(page), len(page) < page_size)


async def catch_up(bus: LiveBus, view: View, after: StreamId) -> Read:
    """One page after `after`, read once for every reader asking for it now (`SessionFeed.read_page`).
    Raises `OffsetGone` when entries after it are no longer retained."""
    feed = await bus.acquire(view.name)
    try:
        page = await feed.read_page(after)
    finally:
        bus.release(feed)
    return Read.of(page, bus.page_size)


class LongPollSink:
    """A long-poll's side of a subscription: the first entries that come, then the response ends."""

    def __init__(self) -> None:
        self.entries: list[StreamEntry] = []
        self.ready = asyncio.Event()
        self.ended: tuple[int, str] | None = None

    def deliver(self, batch: FrameBatch) -> None:
        self.entries.extend(batch.entries)
        self.ready.set()

    async def send(self, frame: bytes) -> None:  # pragma: no cover - an EntrySink is sent entries
        raise AssertionError("an EntrySink is sent entries")

    async def send_entries(self, entries: list[StreamEntry]) -> None:
        self.entries.extend(entries)
        self.ready.set()

    def buffered(self) -> int:
        return 0  # nothing waits on a client: the response takes everything at once

    async def drained(self) -> None:
        return

    def end(self, code: int, reason: str) -> None:
        self.ended = (code, reason)
        self.ready.set()


async def long_poll(bus: LiveBus, view: View, after: StreamId, wait_seconds: float) -> Read | None:
    """The entries after `after`, at once if there are any, else as soon as one is appended; None when
    `wait_seconds` pass first. Ends with `OffsetGone` when the stream is reset under it."""
    sink = LongPollSink()
    subscriber = Subscriber(bus, view.name, after, sink, max_buffer_bytes=1 << 30, slow_policy="close")
    subscriber.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sink.ready.wait(), wait_seconds)
    finally:
        await subscriber.stop()
    if sink.ended is not None:
        raise OffsetGone(sink.ended[1])
    if not sink.entries:
        return None
    return Read.of(sink.entries, bus.page_size)


class SseSink:
    """An SSE response's side of a subscription: entries wait, bounded, for the body to take them."""

    def __init__(self, max_buffer_bytes: int) -> None:
        self.max_buffer_bytes = max_buffer_bytes
        self.entries: list[StreamEntry] = []
        self._buffered = 0
        self.ready = asyncio.Event()
        self._taken = asyncio.Event()
        self.ended: tuple[int, str] | None = None

    def deliver(self, batch: FrameBatch) -> None:
        self._queue(batch.entries)

    async def send(self, frame: bytes) -> None:  # pragma: no cover - an EntrySink is sent entries
        raise AssertionError("an EntrySink is sent entries")

    async def send_entries(self, entries: list[StreamEntry]) -> None:
        self._queue(entries)
        while self._buffered > self.max_buffer_bytes // 2 and self.ended is None:
            self._taken.clear()
            await self._taken.wait()

    def buffered(self) -> int:
        return self._buffered

    async def drained(self) -> None:
        return

    def end(self, code: int, reason: str) -> None:
        self.ended = (code, reason)
        self.ready.set()

    def take(self) -> list[StreamEntry]:
        entries, self.entries, self._buffered = self.entries, [], 0
        self._taken.set()
        return entries

    def _queue(self, entries: list[StreamEntry]) -> None:
        self.entries.extend(entries)
        self._buffered += sum(len(entry.body) for entry in entries)
        self.ready.set()


@dataclass
class _SseState:
    view: View
    position: str
    cursor: str | None
    live: bool = False
    closed: bool = False

    def control(self, *, up_to_date: bool) -> bytes:
        if self.closed:
            return control_event({"streamNextOffset": self.position, "streamClosed": True})
        members: dict[str, object] = {
            "streamNextOffset": self.position,
            "streamCursor": response_cursor(self.cursor, int(time.time() * 1000)),
        }
        if up_to_date:
            members["upToDate"] = True
        return control_event(members)

    def events(self, entries: list[StreamEntry], *, more: bool) -> bytes:
        """A data event and its control event per message (protocol section 5.8: a reader collects data up
        to each control); the close marker as the final control."""
        chunks: list[bytes] = []
        for index, entry in enumerate(entries):
            if not entry.body:
                self.closed = True
                break
            self.position = self.view.offset(entry)
            chunks.append(data_event(self.view.sse_payload(entry)))
            last = index == len(entries) - 1 or not entries[index + 1].body
            chunks.append(self.control(up_to_date=self.live and last and not more))
        if self.closed:
            chunks.append(self.control(up_to_date=True))
        return b"".join(chunks)


async def sse_body(
    bus: LiveBus,
    view: View,
    after: StreamId,
    start: str,
    *,
    cursor: str | None,
    max_buffer_bytes: int,
    keepalive_seconds: float,
    expires_at: float | None = None,
) -> AsyncIterator[bytes]:
    """The response body of ``live=sse``, from `after` (written `start` on the wire). Returning (or the client
    leaving) frees the subscription at once; a reset stream, a slow client or an expired token ends it, and
    the client resumes from its last ``streamNextOffset``."""
    sink = SseSink(max_buffer_bytes)
    subscriber = Subscriber(
        bus, view.name, after, sink, max_buffer_bytes=max_buffer_bytes, slow_policy="close"
    )
    state = _SseState(view, start, cursor)
    subscriber.start()
    subscriber.expire_at(expires_at)
    went_live: asyncio.Future[Any] = asyncio.ensure_future(subscriber.caught_up.wait())
    try:
        while not state.closed and sink.ended is None:
            chunk = await _next_chunk(sink, state, went_live, keepalive_seconds)
            if chunk:
                yield chunk
    finally:
        went_live.cancel()
        await subscriber.stop()


async def _next_chunk(
    sink: SseSink, state: _SseState, went_live: asyncio.Future[Any], keepalive: float
) -> bytes:
    waiting: list[asyncio.Future[Any]] = [asyncio.ensure_future(sink.ready.wait())]
    if not state.live:
        waiting.append(went_live)
    done, _ = await asyncio.wait(waiting, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
    waiting[0].cancel()
    if not done:
        return state.control(up_to_date=state.live)  # keep-alive, and a fresh cursor
    became_live = not state.live and went_live.done()
    state.live = state.live or became_live
    sink.ready.clear()
    entries = sink.take()
    if entries:
        return state.events(entries, more=False)
    if became_live:
        return state.control(up_to_date=True)
    return b""
