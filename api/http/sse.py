"""Server-Sent Events: ``GET /v1/sessions/{session_id}/events``, for clients that cannot speak WebSocket.

The same frames as the relay, as ``id: <offset>`` / ``event: <type>`` / ``data: <frame JSON>``, from the same
live engine (`api.live`): one reader per session per API process, however many SSE clients watch it, and
the same subscriber lifecycle as a WebSocket (catching up, live, slow, closed). A browser's EventSource
reconnects by itself and sends ``Last-Event-ID``; that header wins over ``?after=`` because the browser
reuses the original URL. Each subscriber's queue is bounded; one that does not read gets the slow-consumer
policy of the relay. A subscription that ends (its token expired, its stream was reset, it was too slow
under the ``close`` policy, storage went away) ends the response with an ``error`` event carrying the
close code a WebSocket would have received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from api.live.feed import LiveBus
from api.live.frames import FrameBatch, frame_offset_and_type
from api.live.subscriber import Subscriber
from api.live.subscription import SlowPolicy
from tokenfan.contract.offsets import StreamId

__all__ = ["SseSink", "event_stream", "sse_event", "sse_events"]


def sse_event(frame: bytes) -> bytes:
    """One frame as an SSE event. Frames are compact JSON: they never contain a raw newline."""
    offset, kind = frame_offset_and_type(frame)
    return b"id: " + offset.encode() + b"\nevent: " + kind.encode() + b"\ndata: " + frame + b"\n\n"


def sse_events(frames: list[bytes]) -> bytes:
    """A batch of frames as SSE events (`api.live.frames.FrameEncoder`: encoded once per batch)."""
    return b"".join(sse_event(frame) for frame in frames)


class SseSink:
    """An SSE response's side of a subscription: encoded events wait in a bounded queue for the body."""

    def __init__(self, max_buffer_bytes: int) -> None:
        self.max_buffer_bytes = max_buffer_bytes
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.ready = asyncio.Event()  # something to send, or the end
        self._taken = asyncio.Event()
        self.ended: tuple[int, str] | None = None  # (close code, reason) once the subscription is over

    def deliver(self, batch: FrameBatch) -> None:
        self._queue(batch.encoded(sse_events))

    async def send(self, frame: bytes) -> None:
        """Catch-up's write: waits while the client is behind (back-pressure)."""
        self._queue(sse_event(frame))
        await self._below(self.max_buffer_bytes // 2)

    def buffered(self) -> int:
        return self._buffered

    async def drained(self) -> None:
        await self._below(self.max_buffer_bytes // 4)

    def end(self, code: int, reason: str) -> None:
        self.ended = (code, reason)
        self.ready.set()

    def take(self) -> bytes:
        """Everything queued, for the response body."""
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        self._taken.set()
        return b"".join(chunks)

    def _queue(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self.ready.set()

    async def _below(self, limit: int) -> None:
        while self._buffered > limit and self.ended is None:
            self._taken.clear()
            await self._taken.wait()


async def event_stream(
    bus: LiveBus,
    session_id: str,
    position: StreamId,
    *,
    max_buffer_bytes: int,
    slow_policy: SlowPolicy,
    keepalive_seconds: float,
    expires_at: float | None = None,
) -> AsyncIterator[bytes]:
    """The response body. Returning (or the client leaving) frees the subscription at once. It ends at
    `expires_at` (unix seconds), when the token that opened it does."""
    sink = SseSink(max_buffer_bytes)
    subscriber = Subscriber(
        bus,
        session_id,
        position,
        sink,
        max_buffer_bytes=max_buffer_bytes,
        slow_policy=slow_policy,
        transport="sse",
    )
    subscriber.start()
    subscriber.expire_at(expires_at)
    try:
        yield b"retry: 1000\n\n"
        while True:
            try:
                await asyncio.wait_for(sink.ready.wait(), keepalive_seconds)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            sink.ready.clear()
            chunk = sink.take()
            if chunk:
                yield chunk
            if sink.ended is not None:
                code, reason = sink.ended
                yield (
                    b"event: error\ndata: " + json.dumps({"code": code, "reason": reason}).encode() + b"\n\n"
                )
                return
    finally:
        await subscriber.stop()
