"""One generation followed over the live engine, for as long as one HTTP answer needs it.

A `Follower` is a `Subscriber` of the generation's session (the same shared reader per session and the same
lifecycle as every WebSocket and SSE subscriber: no Redis polling per client), whose sink keeps only the
generation's own events and folds each into what the answer needs (`Fold`: chat chunks, Responses events,
or nothing but state). It starts from just before the generation's first event, so what a fold sees is the
generation from its beginning, one stored event at a time (catch-up does not merge), whether live or
replayed: that is what keeps chunk ids and sequence numbers the same on every resume.

`FollowingResponse` is the ASGI response around it: it answers while following, and stops following the
moment the client leaves. Leaving never cancels the generation (stop ≠ disconnect): the session's
``cancel_when_unwatched_seconds`` decides, as for any other subscriber.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.http.sse import SseSink
from api.live.feed import LiveBus
from api.live.frames import FrameBatch
from api.live.subscriber import Subscriber
from tokenfan.contract.errors import OffsetGone
from tokenfan.contract.offsets import StreamId, parse_offset
from tokenfan.store import GenerationRecord, Store
from tokenfan.store.front_door import event_predecessor

__all__ = ["Fold", "FoldingSink", "Follower", "FollowingResponse", "Serve", "locate"]


async def locate(store: Store, generation_id: str) -> tuple[GenerationRecord, StreamId] | None:
    """Generation `generation_id` and the stream position to follow it from (the entry before its first
    event); None when there is no such generation. Raises `OffsetGone` when its first events were trimmed."""
    session_id = await store.session_of(generation_id)
    if session_id is None:
        return None
    # The tail first, then the record: a generation with no event in the record has all of them after it.
    _, tail = await store.tail(session_id)
    record = await store.generation(generation_id)
    if record is None:
        return None
    if record.first_offset is None:
        return record, tail
    previous = await event_predecessor(store, session_id, parse_offset(record.first_offset))
    if previous is None:
        raise OffsetGone("this generation's first events are no longer retained")
    return record, previous


class Fold(Protocol):
    """What an answer makes of a generation's events, one at a time, in stream order."""

    @property
    def ended(self) -> bool:
        """The generation's terminal event was taken: nothing more will come."""

    def take(self, event: dict[str, Any], position: StreamId, offset: str) -> bytes:
        """The bytes to send for `event` (b"" for none)."""


class FoldingSink(SseSink):
    """An SSE sink that keeps one generation's events and sends what its fold makes of them."""

    def __init__(self, generation_id: str, fold: Fold, max_buffer_bytes: int) -> None:
        super().__init__(max_buffer_bytes)
        self.generation_id = generation_id
        self.fold = fold
        # Bodies are compact JSON: this is how each of the generation's events names it. Content that spells
        # it out is escaped (\"), so only a real member matches; `_take` checks the member anyway.
        self._mark = b'"generation_id":"' + generation_id.encode() + b'"'

    def deliver(self, batch: FrameBatch) -> None:
        for entry in batch.entries:  # the entries, never the merged frames: one event at a time
            if self._mark in entry.body and not self.fold.ended:
                self._take(
                    json.loads(entry.body), entry.stream_id, f"{entry.epoch.decode()}:{entry.stream_id}"
                )

    async def send(self, frame: bytes) -> None:
        if self._mark in frame and not self.fold.ended:
            event = json.loads(frame)
            self._take(event, parse_offset(event["offset"]).stream_id, event["offset"])
        await self._below(self.max_buffer_bytes // 2)

    def _take(self, event: dict[str, Any], position: StreamId, offset: str) -> None:
        if event.get("generation_id") != self.generation_id:
            return
        chunk = self.fold.take(event, position, offset)
        if chunk:
            self._queue(chunk)
        else:
            self.ready.set()  # the fold moved on without output: whoever waits on it looks again


class Follower:
    """Follows generation `generation_id` of `session_id` from stream position `position` (the entry before
    its first event). `start()` it, `stop()` it; in between, `until` waits and `take` collects output."""

    def __init__(
        self,
        bus: LiveBus,
        session_id: str,
        generation_id: str,
        position: StreamId,
        fold: Fold,
        *,
        max_buffer_bytes: int,
        expires_at: float | None = None,
    ) -> None:
        self.fold = fold
        self.sink = FoldingSink(generation_id, fold, max_buffer_bytes)
        # A client too slow for its buffer is cut loose (it resumes where it was); a snapshot would merge
        # events, which a fold cannot number.
        self.subscriber = Subscriber(
            bus,
            session_id,
            position,
            self.sink,
            max_buffer_bytes=max_buffer_bytes,
            slow_policy="close",
            merge=False,
            transport="openai",
        )
        self.expires_at = expires_at

    def start(self) -> None:
        self.subscriber.start()
        self.subscriber.expire_at(self.expires_at)

    async def stop(self) -> None:
        await self.subscriber.stop()

    @property
    def closed(self) -> tuple[int, str] | None:
        """(close code, reason) once the subscription ended before the generation did: the stream was reset
        or trimmed, storage went away, the token expired, the client was too slow."""
        return self.sink.ended if not self.fold.ended else None

    def take(self) -> bytes:
        return self.sink.take()

    async def until(
        self, done: Callable[[], bool], *, within: float | None = None, caught_up: bool = False
    ) -> bool:
        """Wait until `done()` holds, the subscription ends, or (with `caught_up`) everything the stream held
        was folded; False when `within` seconds passed first."""
        waits = [self.sink.ready] + ([self.subscriber.caught_up] if caught_up else [])
        try:
            async with asyncio.timeout(within):
                while not (done() or self.sink.ended is not None or any(w.is_set() for w in waits[1:])):
                    self.sink.ready.clear()
                    await _any_set(waits)
        except TimeoutError:
            return False
        return True

    async def pump(
        self, write: Callable[[bytes], Awaitable[None]], keepalive: float
    ) -> tuple[int, str] | None:
        """Write what the fold makes until the generation ends; a comment every `keepalive` seconds of quiet.
        Returns the (close code, reason) when the subscription ended first."""
        while True:
            ended = self.fold.ended  # read before taking: everything it made is then in this chunk
            chunk = self.take()
            if chunk:
                await write(chunk)
            if ended:
                return None
            if self.closed is not None:
                return self.closed
            if not await self.until(lambda: self.sink.buffered() > 0 or self.fold.ended, within=keepalive):
                await write(b": keep-alive\n\n")


async def _any_set(events: list[asyncio.Event]) -> None:
    if len(events) == 1:
        await events[0].wait()
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


#: Answers one request over a started `Follower`, writing ASGI messages with `Send`.
Serve = Callable[[Follower, Send], Awaitable[None]]


class FollowingResponse(Response):
    """An ASGI response that follows a generation while `serve` answers, counted among its client address's
    open streams (`streams`), and stops following as soon as the client leaves."""

    def __init__(self, follower: Follower, serve: Serve, *, streams: Counter[str], address: str) -> None:
        super().__init__()  # status and headers are `serve`'s to send, once it knows them
        self.follower = follower
        self.serve = serve
        self.streams = streams
        self.address = address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.streams[self.address] += 1
        self.follower.start()
        try:
            await _first_of(self.serve(self.follower, send), _until_disconnect(receive))
        finally:
            await self.follower.stop()
            self.streams[self.address] -= 1
            if not self.streams[self.address]:
                del self.streams[self.address]


async def _until_disconnect(receive: Receive) -> None:
    # uvicorn discards writes to a client that left without a word: only receive() tells.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_of(serving: Awaitable[None], watching: Awaitable[None]) -> None:
    """Serve until done or the client leaves, whichever comes first; an error while serving propagates."""
    serve_task, watch_task = asyncio.ensure_future(serving), asyncio.ensure_future(watching)
    try:
        await asyncio.wait((serve_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (serve_task, watch_task):
            task.cancel()
        await asyncio.gather(serve_task, watch_task, return_exceptions=True)
    if not serve_task.cancelled():
        serve_task.result()  # an error while serving propagates
