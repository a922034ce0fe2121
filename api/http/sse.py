"""Server-Sent Events: ``GET /v1/sessions/{session_id}/events``, for clients that cannot speak WebSocket.

The same frames as the relay, as ``id: <offset>`` / ``event: <type>`` / ``data: <frame JSON>``, from the same
shared feed code (`api.live.feed`): one reader per session per API process, however many SSE clients
watch it. A browser's EventSource reconnects by itself and sends ``Last-Event-ID``; that header wins over
``?after=`` because the browser reuses the original URL. Each subscriber's queue is bounded; one that
does not read gets the slow-consumer treatment of the relay. A stream opened with a session token ends
when the token does, with an ``error`` event (4401): the page opens a new EventSource with a fresh token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable

import structlog
from websockets.asyncio.server import ServerConnection

from api.live.feed import LiveBus
from api.live.frames import frame_offset_and_type
from api.live.handoff import Handoff
from tokenfan.contract.errors import TokenfanError, Unauthorized
from tokenfan.contract.offsets import StreamId

__all__ = ["SseSubscriber", "event_stream", "sse_event"]

log = structlog.get_logger("tokenfan.api.sse")


def sse_event(frame: bytes) -> bytes:
    """One frame as an SSE event. Frames are compact JSON: they never contain a raw newline."""
    offset, kind = frame_offset_and_type(frame)
    return b"id: " + offset.encode() + b"\nevent: " + kind.encode() + b"\ndata: " + frame + b"\n\n"


class SseSubscriber:
    """A `Subscriber` (see `api.live.feed`) whose frames wait in a bounded queue for the response."""

    websocket: ServerConnection | None = None

    def __init__(self, position: StreamId, max_buffer_bytes: int) -> None:
        self.handoff = Handoff(position)
        self.max_buffer_bytes = max_buffer_bytes
        self.queue: deque[bytes] = deque()
        self.buffered = 0
        self.ready = asyncio.Event()  # something to send, or something happened
        self.drained = asyncio.Event()
        self.slow = False
        self.ended: tuple[int, str] | None = None  # (close code, reason) once the stream cannot go on

    def send_frames(self, frames: list[bytes]) -> None:
        self.queue.extend(frames)
        self.buffered += sum(len(frame) for frame in frames)
        self.ready.set()

    async def send(self, frame: bytes) -> None:
        """Catch-up's write: waits while the client is behind (back-pressure)."""
        self.send_frames([frame])
        while self.buffered > self.max_buffer_bytes // 2:
            self.drained.clear()
            await self.drained.wait()

    def take(self) -> list[bytes]:
        frames = list(self.queue)
        self.queue.clear()
        self.buffered = 0
        self.drained.set()
        return frames

    def is_slow(self) -> bool:
        return self.buffered > self.max_buffer_bytes

    def on_slow(self) -> None:
        self.slow = True
        self.ready.set()

    def reset(self, reason: str) -> None:
        self.ended = (4410, reason)
        self.ready.set()

    def expire(self) -> None:
        """The token that opened the stream has expired: end it."""
        self.ended = (Unauthorized.close_code, "the token has expired: reconnect with a fresh one")
        self.ready.set()


async def event_stream(
    bus: LiveBus,
    session_id: str,
    subscriber: SseSubscriber,
    *,
    keepalive_seconds: float,
    expires_at: float | None = None,
) -> AsyncIterator[bytes]:
    """The response body. Returning (or the client leaving) frees the subscription at once. It ends at
    `expires_at` (unix seconds), when the token that opened it does."""
    feed = await bus.acquire(session_id)
    task = asyncio.create_task(_guard(subscriber, feed.catch_up(subscriber, subscriber.send)))
    expiry = None
    if expires_at is not None:
        expiry = asyncio.get_running_loop().call_later(max(0.0, expires_at - time.time()), subscriber.expire)
    try:
        yield b"retry: 1000\n\n"
        while True:
            try:
                await asyncio.wait_for(subscriber.ready.wait(), keepalive_seconds)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            subscriber.ready.clear()
            frames = subscriber.take()
            if frames:
                yield b"".join(sse_event(frame) for frame in frames)
            if subscriber.ended is not None:
                code, reason = subscriber.ended
                yield (
                    b"event: error\ndata: " + json.dumps({"code": code, "reason": reason}).encode() + b"\n\n"
                )
                return
            if subscriber.slow and task.done():
                subscriber.slow = False
                log.info("slow_consumer_recovering", session_id=session_id)
                task = asyncio.create_task(_guard(subscriber, feed.recover(subscriber, subscriber.send)))
    finally:
        if expiry is not None:
            expiry.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        feed.leave(subscriber)
        bus.release(feed)


async def _guard(subscriber: SseSubscriber, work: Awaitable[None]) -> None:
    """Run catch-up or recovery; a failure ends the stream with the error's close code."""
    try:
        await work
    except TokenfanError as exc:
        subscriber.ended = (exc.close_code, exc.message)
        subscriber.ready.set()
