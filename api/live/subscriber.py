"""One subscription driven over any transport: the lifecycle every subscriber shares, WebSocket or SSE.

`Subscriber` carries out what the subscription table (`api.live.subscription`) decides: it reads catch-up
pages and sends them, joins the session's feed, recovers a slow subscriber with a snapshot, ends the
subscription when its token expires or its stream is reset, and maps every error to one close code
(`close_for`). The transport is a `Sink`: the relay writes to a WebSocket (or sends an error frame on a
multi-session connection), the HTTP API queues SSE events. Nothing here knows which.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Protocol, cast, runtime_checkable

import structlog

from api.live.feed import LiveBus, SessionFeed
from api.live.frames import FrameBatch
from api.live.metrics import Phase
from api.live.subscription import Action, Input, SlowPolicy, State, Subscription
from tokenfan.contract.errors import OffsetGone, TokenfanError, Unauthorized
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

__all__ = [
    "SLOW_CONSUMER_CLOSE_CODE",
    "TOKEN_EXPIRED_REASON",
    "BatchSink",
    "EntrySink",
    "Sink",
    "SinkClosed",
    "Subscriber",
    "close_for",
]

log = structlog.get_logger("tokenfan.live")

#: Close code of the ``close`` slow policy: resume from your last offset (docs/PROTOCOL.md).
SLOW_CONSUMER_CLOSE_CODE = 4008
SLOW_CONSUMER_REASON = "too slow: reconnect after your last offset"
#: Why a subscription authorized by a session token ends when the token does (close code or error 4401).
TOKEN_EXPIRED_REASON = "the token has expired: reconnect with a fresh one after your last offset"  # noqa: S105
_INTERNAL_ERROR = (1011, "internal error")


class SinkClosed(Exception):
    """The transport is gone (the client disconnected): the subscription ends without a word."""


class Sink(Protocol):
    """A transport's side of one subscription."""

    def deliver(self, batch: FrameBatch) -> None:
        """Queue a live batch without waiting (the feed calls this for every live subscriber at once)."""

    async def send(self, frame: bytes) -> None:
        """Send one catch-up frame, waiting while the client is behind; raises `SinkClosed` once gone."""

    def buffered(self) -> int:
        """Bytes written and not yet taken by the client: past `max_buffer_bytes` the subscriber is slow."""

    async def drained(self) -> None:
        """Wait until the client has taken most of what is queued (or is gone)."""

    def end(self, code: int, reason: str) -> None:
        """The subscription is over: tell the client (a close code, an error frame, an SSE error event)."""


@runtime_checkable
class EntrySink(Sink, Protocol):
    """A sink that takes stored entries rather than frames: a stream whose entries are not session events
    (a Durable Streams stream's bytes), or a protocol that frames them its own way. Its `deliver` reads
    ``batch.entries`` only, so no frame is ever made of them."""

    async def send_entries(self, entries: list[StreamEntry]) -> None:
        """Send a catch-up page, waiting while the client is behind; raises `SinkClosed` once gone."""


@runtime_checkable
class BatchSink(Sink, Protocol):
    """A sink that sends several catch-up pages' frames at once: few writes of the batches' encodings, each
    made once for every subscriber reading that page (`FrameBatch.encoded`), instead of a send per frame."""

    async def send_batches(self, batches: list[FrameBatch]) -> None:
        """Send catch-up pages' frames, in order, waiting while the client is behind; raises `SinkClosed` once
        gone."""


#: Whether each class of sink is an `EntrySink` and a `BatchSink`, asked once per class: an isinstance check
#: against a runtime Protocol walks its members (2% of the relay's CPU in a storm of 100 resumes when asked
#: once per subscriber, more when asked on every page). Sinks have their methods on their class.
_SINK_KINDS: dict[type, tuple[bool, bool]] = {}


def _sink_kinds(sink: Sink) -> tuple[bool, bool]:
    kinds = _SINK_KINDS.get(type(sink))
    if kinds is None:
        kinds = _SINK_KINDS[type(sink)] = (isinstance(sink, EntrySink), isinstance(sink, BatchSink))
    return kinds


def close_for(error: BaseException) -> tuple[int, str]:
    """The close code and reason that end a subscription because of `error` (docs/PROTOCOL.md)."""
    if isinstance(error, TokenfanError):
        return error.close_code, error.message
    return _INTERNAL_ERROR


class Subscriber:
    """Drives one `Subscription` of one session over one `Sink`. `start()` it; `stop()` it when the client
    leaves. It ends by itself (telling the sink) on expiry, reset, slowness under the close policy, or error.
    """

    def __init__(
        self,
        bus: LiveBus,
        session_id: str,
        position: StreamId,
        sink: Sink,
        *,
        max_buffer_bytes: int,
        slow_policy: SlowPolicy,
        merge: bool = True,
        transport: str = "other",
    ) -> None:
        self.bus = bus
        self.transport = transport  # the `transport` label of the subscriptions gauge
        self.session_id = session_id
        self.sink = sink
        self.core = Subscription(position, slow_policy)
        self.max_buffer_bytes = max_buffer_bytes
        #: False: catch-up sends every entry as its own frame. A sink that numbers what it derives from each
        #: stored event (the OpenAI front door's sequence numbers) must see the same events live or replayed.
        self.merge = merge
        #: Set once the subscription has sent everything the stream held and joined the live feed.
        self.caught_up = asyncio.Event()
        self.feed: SessionFeed | None = None
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._counted = False  # in the subscriptions gauge: from start() to the end, whichever it is

    @property
    def state(self) -> State:
        return self.core.state

    def start(self) -> None:
        """Join the session's feed and catch up from the position, in a task of its own."""
        self._counted = True
        self.bus.metrics.subscriptions.labels(self.transport).inc()
        self._spawn(self._open())

    async def stop(self) -> None:
        """The client left or unsubscribed: leave quietly."""
        self._execute(self.core.apply(Input.LEFT))
        self._release()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def expire_at(self, expires_at: float | None) -> None:
        """End the subscription at `expires_at` (unix seconds; None: never), replacing any earlier deadline.
        A stream must not outlive the token that authorized it."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if expires_at is not None and self.core.state.is_open:
            delay = max(0.0, expires_at - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)

    # --- called by the feed

    def on_live_batch(self, batch: FrameBatch, before: StreamId | None) -> int:
        if self.sink.buffered() > self.max_buffer_bytes:
            self._handle(Input.OVER_LIMIT, SLOW_CONSUMER_CLOSE_CODE, SLOW_CONSUMER_REASON)
            return 0
        entries = batch.entries
        fresh = self.core.on_live(entries, before)
        if not fresh:
            return 0
        if len(fresh) < len(entries):  # it read ahead of the feed while catching up
            batch = FrameBatch(fresh)
        self.sink.deliver(batch)
        return len(batch.frames)

    def on_reset(self, reason: str) -> None:
        self._handle(Input.RESET, OffsetGone.close_code, reason)

    # --- the table's actions

    def _handle(self, event: Input, code: int = 1000, reason: str = "") -> None:
        self._execute(self.core.apply(event), code, reason)

    def _execute(self, actions: tuple[Action, ...], code: int = 1000, reason: str = "") -> None:
        for action in actions:
            if action is Action.JOIN_FEED:
                assert self.feed is not None
                self.feed.join(self)
                self.caught_up.set()
            elif action is Action.LEAVE_FEED:
                if self.feed is not None:
                    self.feed.leave(self)
            elif action is Action.READ_PAGE:
                self._spawn(self._read_pages())
            elif action is Action.SEND_SNAPSHOT:
                log.info(
                    "slow_consumer_recovering", session_id=self.session_id, buffered=self.sink.buffered()
                )
                self.bus.metrics.slow.labels("snapshot").inc()
                self._spawn(self._recover())
            elif action is Action.CLOSE:
                self._end(code, reason)
            # Action.SEND is the data path's own: `on_live_batch` and `_read_pages` send what is fresh.

    def _end(self, code: int, reason: str) -> None:
        if code == SLOW_CONSUMER_CLOSE_CODE:
            log.info("slow_consumer_closed", session_id=self.session_id, buffered=self.sink.buffered())
            self.bus.metrics.slow.labels("close").inc()
        self.bus.metrics.ended.labels(str(code)).inc()
        self._release()
        self.sink.end(code, reason)

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.bus.metrics.subscriptions.labels(self.transport).dec()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        feed, self.feed = self.feed, None
        if feed is not None:
            feed.leave(self)
            self.bus.release(feed)

    def _expired(self) -> None:
        self._expiry = None
        log.info("subscription_token_expired", session_id=self.session_id)
        self._handle(Input.TOKEN_EXPIRED, Unauthorized.close_code, TOKEN_EXPIRED_REASON)

    # --- the work done in tasks

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._guarded(work))

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except SinkClosed:
            self._execute(self.core.apply(Input.LEFT))
            self._release()
        except Exception as exc:
            if not isinstance(exc, TokenfanError):
                log.exception("subscription_failed", session_id=self.session_id)
            self._handle(Input.FAILED, *close_for(exc))

    async def _open(self) -> None:
        feed = await self.bus.acquire(self.session_id)
        if not self.core.state.is_open:  # stopped while waiting for the feed
            self.bus.release(feed)
            return
        self.feed = feed
        await self._read_pages()

    async def _read_pages(self) -> None:
        """Action.READ_PAGE: send what the stream holds after the position, page by page, until the feed's
        position is reached; then join the feed, with no await between the last check and the join."""
        feed, core = self.feed, self.core
        assert feed is not None
        takes_entries, takes_batches = _sink_kinds(self.sink)
        entry_sink = cast(EntrySink, self.sink) if takes_entries else None
        batch_sink = cast(BatchSink, self.sink) if self.merge and takes_batches else None
        with feed.catching_up():
            while not core.can_go_live(feed.position):
                if core.state is not State.CATCHING_UP:
                    return  # ended while a page was on its way
                if batch_sink is not None and await self._send_held_run(feed, batch_sink):
                    continue
                page = await feed.read_page(core.position)
                fresh = core.on_page(page)
                if entry_sink is not None:
                    if fresh:
                        await entry_sink.send_entries(fresh)
                elif batch_sink is not None:
                    batches = [feed.page_batch(fresh)] if fresh else []
                    await batch_sink.send_batches(batches)
                    for frame in (frame for batch in batches for frame in batch.frames):
                        self.bus.metrics.sent(Phase.CATCHUP, frame)
                else:
                    frames = feed.page_batch(fresh).frames if self.merge else [e.frame() for e in fresh]
                    for frame in frames:
                        await self.sink.send(frame)
                        self.bus.metrics.sent(Phase.CATCHUP, frame)
        self._execute(core.go_live(feed.position))

    async def _send_held_run(self, feed: SessionFeed, sink: BatchSink) -> bool:
        """Once the feed's history has grown back to the position (if it can), send the run it holds right
        after it; False when it holds none (the position is then read from Redis). No await between taking
        the run and moving the position."""
        await feed.grow_back_to(self.core.position)
        run = feed.held_run(self.core.position)
        if run is None or not self.core.on_run(run.first, run.last):
            return False
        await sink.send_batches(run.batches)
        self.bus.metrics.sent_many(Phase.CATCHUP, run.frames, run.frame_bytes)
        return True

    async def _recover(self) -> None:
        """Action.SEND_SNAPSHOT: let the client take what is already queued for it, then replace the rest of
        its backlog with one snapshot frame, and catch up from the snapshot's position."""
        await self.sink.drained()
        assert self.feed is not None
        snapshot = await self.feed.snapshot_after(self.core.position, "slow_consumer")
        if snapshot is None:
            self.on_reset("the session's stream is gone; rebuild from a snapshot")
            return
        frame, position = snapshot
        await self.sink.send(frame)
        self.bus.metrics.sent(Phase.SNAPSHOT, frame)
        self._execute(self.core.restart_at(position))
