"""The shared live reader: one Redis pub/sub connection per process, one `SessionFeed` per watched session.

However many subscribers watch a session in this process, its events reach the process once (the pub/sub
message the append script publishes), are encoded into frames once, and are written to every in-sync
subscriber by `websockets.broadcast`. Redis load therefore grows with sessions, not with subscribers.

Pub/sub is at-most-once, so a feed never trusts it blindly: `FeedCursor` checks that each message follows the
last one delivered, and the feed reads any missed range from the stream itself before going on. After a
reconnect, every feed re-reads from its position. A feed whose last subscriber left lingers for
``linger_seconds`` (a reconnecting client usually comes straight back), then unsubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from api.live.frames import frames_for, snapshot_frame
from api.live.handoff import FeedCursor, Handoff, Phase, Verdict
from tokenfan.contract.errors import OffsetGone, StorageUnavailable
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import StreamId
from tokenfan.store import Store

__all__ = ["LiveBus", "SessionFeed", "Subscriber", "write_frames"]

log = structlog.get_logger("tokenfan.relay.feed")


class Subscriber(Protocol):
    """What a feed needs from one subscription (a WebSocket or an SSE response)."""

    handoff: Handoff
    #: Set for WebSocket subscribers: in-sync ones get each frame in one `websockets.broadcast` call.
    websocket: ServerConnection | None

    def send_frames(self, frames: list[bytes]) -> None:
        """Queue frames without waiting."""

    def is_slow(self) -> bool:
        """Whether the subscriber's buffer is over its limit (checked before each live batch)."""

    def on_slow(self) -> None:
        """The feed stopped sending to it; it recovers by itself (`SessionFeed.recover`) or closes."""

    def reset(self, reason: str) -> None:
        """The stream was recreated, or trimmed past it: its offsets mean nothing any more."""


#: Catch-up pages whose frames a feed keeps while subscribers catch up (each page's frames: at most about
#: 100 KB with the default page size).
_PAGES_KEPT = 16

#: Awaitable write of one frame to a subscriber: applies that subscriber's back-pressure.
Send = Callable[[bytes], Awaitable[None]]


class SessionFeed:
    """The live tail of one session in this process."""

    def __init__(self, bus: LiveBus, session_id: str) -> None:
        self.bus = bus
        self.session_id = session_id
        self.channel = SessionKeys(session_id).live.encode()
        self.cursor = FeedCursor(None, StreamId.ZERO)
        self.subscribers: dict[Subscriber, None] = {}
        self.references = 0
        self.ready = asyncio.Event()  # the cursor is known: subscribers may join
        self.frames_sent = 0  # frames written to subscribers (one frame to n subscribers counts n)
        self._pending: list[tuple[StreamEntry, StreamId]] = []
        self._repairing = False
        self._linger: asyncio.TimerHandle | None = None
        self._delivered: StreamId | None = None  # the last entry of the previous batch fanned out
        self._catching_up = 0  # subscribers in `catch_up` now
        self._pages: dict[tuple[bytes, StreamId, StreamId, int], list[bytes]] = {}  # while any is
        self._reads: dict[tuple[StreamId, int], asyncio.Future[list[StreamEntry]]] = {}  # in flight

    @property
    def position(self) -> StreamId:
        return self.cursor.position

    def join(self, subscriber: Subscriber) -> None:
        """Make a caught-up subscriber live. Must follow its last catch-up check with no await between."""
        subscriber.handoff.go_live(self.cursor.position)
        self.subscribers[subscriber] = None

    def leave(self, subscriber: Subscriber) -> None:
        self.subscribers.pop(subscriber, None)
        subscriber.handoff.close()

    async def catch_up(self, subscriber: Subscriber, send: Send) -> None:
        """Send what the subscriber is missing from the stream, page by page, then make it live."""
        handoff = subscriber.handoff
        page_size = self.bus.page_size
        self._catching_up += 1
        try:
            while not handoff.can_go_live(self.cursor.position):
                page = await self._read_page(handoff.position, page_size)
                for frame in self._page_frames(handoff.on_page(page)):
                    await send(frame)
        finally:
            self._catching_up -= 1
            if not self._catching_up:
                self._pages.clear()
        self.join(subscriber)  # no await since the check above: nothing can slip between

    async def _read_page(self, after: StreamId, count: int) -> list[StreamEntry]:
        """`Store.read_after`, with the reads of subscribers at the same position at the same time shared:
        one that asks while an identical read is in flight waits for that one. Its answer is a contiguous
        run after `after`, read after the subscription's resume point was validated, which is all catch-up
        needs (a page that ends early only means one more read)."""
        key = (after, count)
        pending = self._reads.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.bus.store.read_after(self.session_id, after, count))
            self._reads[key] = pending
            pending.add_done_callback(functools.partial(self._read_done, key))
        return await asyncio.shield(pending)  # one reader's cancellation leaves the others' read alone

    def _read_done(self, key: tuple[StreamId, int], read: asyncio.Future[list[StreamEntry]]) -> None:
        if self._reads.get(key) is read:
            del self._reads[key]
        if not read.cancelled():
            read.exception()  # retrieved: every waiter may have been cancelled

    def _page_frames(self, entries: list[StreamEntry]) -> list[bytes]:
        """`frames_for` a catch-up page, shared by subscribers catching up over the same range (a burst of
        reconnects resumes from the same offset, so their pages coincide). A page is a contiguous run of one
        stream incarnation, so its epoch, first and last id and length identify its entries exactly."""
        if len(entries) < 2:
            return frames_for(entries)
        key = (entries[0].epoch, entries[0].stream_id, entries[-1].stream_id, len(entries))
        frames = self._pages.get(key)
        if frames is None:
            frames = self._pages[key] = frames_for(entries)
            if len(self._pages) > _PAGES_KEPT:
                del self._pages[next(iter(self._pages))]
        return frames

    async def recover(self, subscriber: Subscriber, send: Send, reason: str = "slow_consumer") -> None:
        """Skip a slow subscriber's backlog: one `snapshot` frame of every generation that changed after
        its position, then the stream from the snapshot's offset, then live."""
        snapshot = await self.bus.store.snapshot(self.session_id, since=subscriber.handoff.position)
        if snapshot is None or snapshot.offset is None:
            subscriber.reset("the session's stream is gone; rebuild from a snapshot")
            return
        generations = [record.as_json() for record in snapshot.generations]
        await send(snapshot_frame(self.session_id, str(snapshot.offset), generations, reason))
        subscriber.handoff = Handoff(snapshot.offset.stream_id)
        await self.catch_up(subscriber, send)

    # --- driven by the bus

    def on_published(self, entry: StreamEntry, previous: StreamId) -> None:
        if not self.ready.is_set() or self._repairing:
            self._pending.append((entry, previous))
            return
        self._process([(entry, previous)])

    def on_subscribed(self) -> None:
        """Our channel subscription is confirmed: anything appended from now on will be published to us,
        so reading the position now (first time) or repairing from it (after a reconnect) misses nothing."""
        self._start_repair(initial=not self.ready.is_set())

    def _process(self, messages: list[tuple[StreamEntry, StreamId]]) -> None:
        run: list[StreamEntry] = []
        for index, (entry, previous) in enumerate(messages):
            verdict = self.cursor.judge(entry, previous)
            if verdict is Verdict.RESET:
                self._fanout(run)
                run = []
                self._reset(entry.epoch)
                verdict = self.cursor.judge(entry, previous)
            if verdict is Verdict.NEXT:
                self.cursor.advance([entry])
                run.append(entry)
            elif verdict is Verdict.GAP:
                self._fanout(run)
                self._pending = messages[index:] + self._pending
                self._start_repair(initial=False)
                return
        self._fanout(run)

    def _reset(self, epoch: bytes) -> None:
        log.warning("stream_reset", session_id=self.session_id)
        self._delivered = None
        self.cursor.reset(epoch)
        for subscriber in list(self.subscribers):
            subscriber.reset("the session's stream was recreated; rebuild from a snapshot")
        self.subscribers.clear()

    def _reset_to(self, position: StreamId) -> None:
        for subscriber in list(self.subscribers):
            subscriber.reset("events were trimmed before they could be delivered; rebuild from a snapshot")
        self.subscribers.clear()
        self._delivered = None
        self.cursor.position = position
        self.ready.set()

    def _start_repair(self, *, initial: bool) -> None:
        if self._repairing:
            return
        self._repairing = True
        self.bus._spawn(self._repair(initial))

    async def _repair(self, initial: bool) -> None:
        try:
            if initial:
                epoch, last = await self.bus.store.tail(self.session_id)
                self.cursor = FeedCursor(epoch, last)
            else:
                while True:
                    page = await self.bus.store.read_after(
                        self.session_id, self.cursor.position, self.bus.page_size
                    )
                    if page and self.cursor.epoch is not None and page[-1].epoch != self.cursor.epoch:
                        self._reset(page[-1].epoch)
                        continue
                    self._fanout(self.cursor.advance(page))
                    if len(page) < self.bus.page_size:
                        break
        except OffsetGone:
            # We fell so far behind that the stream dropped entries we never delivered: nobody may resume
            # from our position any more.
            self._repairing = False
            _, last = await self.bus.store.tail(self.session_id)
            self._reset_to(last)
            return
        except StorageUnavailable as exc:
            # The bus reconnects and calls on_subscribed again, which retries this.
            log.warning("feed_repair_failed", session_id=self.session_id, error=str(exc))
            self._repairing = False
            return
        self._repairing = False
        self.ready.set()
        pending, self._pending = self._pending, []
        if pending:
            self._process(pending)

    def _fanout(self, entries: list[StreamEntry]) -> None:
        if not entries:
            return
        before, last = self._delivered, entries[-1].stream_id
        self._delivered = last
        if not self.subscribers:
            return
        frames: list[bytes] | None = None
        sockets: list[ServerConnection] = []
        for subscriber in list(self.subscribers):
            if subscriber.is_slow():
                del self.subscribers[subscriber]
                subscriber.on_slow()
                continue
            handoff = subscriber.handoff
            if handoff.position is before and handoff.phase is Phase.LIVE:
                # In step with the feed since its previous batch (this very position object was set below,
                # or by `on_live`): all of `entries` is fresh. Exactly what `on_live` would compute,
                # without comparing every entry for every subscriber.
                handoff.position = last
            else:
                fresh = handoff.on_live(entries)
                if not fresh:
                    continue
                if len(fresh) < len(entries):  # it read ahead of the feed while catching up
                    partial = frames_for(fresh)
                    subscriber.send_frames(partial)
                    self.frames_sent += len(partial)
                    continue
            frames = frames if frames is not None else frames_for(entries)
            if subscriber.websocket is not None:
                sockets.append(subscriber.websocket)
            else:
                subscriber.send_frames(frames)
                self.frames_sent += len(frames)
        if frames is not None and sockets:
            write_frames(sockets, frames)
            self.frames_sent += len(frames) * len(sockets)


def write_frames(sockets: list[ServerConnection], frames: list[bytes]) -> None:
    """Write text frames to every socket, as `websockets.broadcast` of each frame would, but cheaper.

    A server's frame is the same bytes for every connection (servers do not mask, and the relay negotiates
    no extension), so each frame is serialized once, by websockets' own `Frame.serialize`, and all of a
    batch's frames reach each connection in one transport write (one system call, not one per frame).
    A connection that is not open, or in any state where the library's own path could behave otherwise
    (a fragmented send in progress, an extension, pending protocol output), goes through `broadcast`.
    """
    wire = b"".join(Frame(Opcode.TEXT, frame).serialize(mask=False) for frame in frames)
    for websocket in sockets:
        protocol = websocket.protocol
        if (
            protocol.state is State.OPEN
            and websocket.send_in_progress is None
            and not protocol.writes
            and not protocol.extensions
            and not protocol.expect_continuation_frame
        ):
            try:
                websocket.transport.write(wire)
            except Exception as exc:  # as broadcast: one failed write must not stop the others
                websocket.logger.warning("skipped broadcast: failed to write message: %r", exc)
        else:
            for frame in frames:
                broadcast([websocket], frame, text=True)


class LiveBus:
    """Owns the process's pub/sub connection and its feeds. Start with `start()`, end with `close()`."""

    def __init__(
        self, redis: Redis, store: Store, *, page_size: int = 512, linger_seconds: float = 5.0
    ) -> None:
        self.redis = redis
        self.store = store
        self.page_size = page_size
        self.linger_seconds = linger_seconds
        self.feeds: dict[str, SessionFeed] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._by_channel: dict[bytes, SessionFeed] = {}
        self._pubsub: PubSub | None = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._batch: dict[SessionFeed, list[tuple[StreamEntry, StreamId]]] = {}  # read, not yet handled
        self._flush_scheduled = False

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="live-bus")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def acquire(self, session_id: str) -> SessionFeed:
        """The feed of `session_id`, ready to be joined. Pair every call with `release`."""
        feed = self.feeds.get(session_id)
        if feed is None:
            feed = SessionFeed(self, session_id)
            self.feeds[session_id] = feed
            self._by_channel[feed.channel] = feed
            await self._subscribe(feed)
        elif feed._linger is not None:
            feed._linger.cancel()
            feed._linger = None
        feed.references += 1
        try:
            await feed.ready.wait()
        except BaseException:
            self.release(feed)
            raise
        return feed

    def release(self, feed: SessionFeed) -> None:
        feed.references -= 1
        if feed.references == 0:
            feed._linger = asyncio.get_running_loop().call_later(self.linger_seconds, self._drop, feed)

    def _drop(self, feed: SessionFeed) -> None:
        if feed.references > 0 or self.feeds.get(feed.session_id) is not feed:
            return
        del self.feeds[feed.session_id]
        del self._by_channel[feed.channel]
        if self._pubsub is not None and self._connected.is_set():
            self._spawn(self._unsubscribe(feed.channel))

    async def _unsubscribe(self, channel: bytes) -> None:
        with contextlib.suppress(RedisError):
            if self._pubsub is not None and channel not in self._by_channel:
                await self._pubsub.unsubscribe(channel)

    async def _subscribe(self, feed: SessionFeed) -> None:
        await self._connected.wait()
        assert self._pubsub is not None
        with contextlib.suppress(RedisError):  # the reader reconnects and subscribes every feed again
            await self._pubsub.subscribe(feed.channel)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read_forever(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self.redis.pubsub()
            try:
                # A placeholder channel keeps the connection in subscribe mode while no session is watched.
                await pubsub.subscribe(b"tf:relay:idle", *self._by_channel)
                self._pubsub = pubsub
                self._connected.set()
                backoff = 0.05
                await self._read(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("live_bus_reconnecting", error=str(exc), backoff_s=backoff)
            finally:
                self._connected.clear()
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A blocking read returns at once while replies are buffered, and waits (lets the loop run) only
            # once everything that arrived has been read. The batch is handled then: what arrived together
            # reaches each feed as one run (one broadcast pass), without a timed read per message.
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
            self._route(message, self._batch)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._batch = self._batch, {}
        for feed, messages in batch.items():
            if feed.ready.is_set() and not feed._repairing:
                feed._process(messages)
            else:
                feed._pending.extend(messages)

    def _route(
        self, message: dict[str, object], batch: dict[SessionFeed, list[tuple[StreamEntry, StreamId]]]
    ) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        feed = self._by_channel.get(channel) if isinstance(channel, bytes) else None
        if feed is None:
            return
        if kind == "subscribe":
            feed.on_subscribed()
        elif kind == "message":
            data = message.get("data")
            if not isinstance(data, bytes):
                return
            epoch, previous, entry_id, body = data.split(b" ", 3)
            entry = StreamEntry(_stream_id(entry_id), epoch, body)
            batch.setdefault(feed, []).append((entry, _stream_id(previous)))


def _stream_id(raw: bytes) -> StreamId:
    """An entry id as the append script publishes it (Redis's own ``<ms>-<seq>``): `StreamId.parse` minus
    its validation of untrusted input."""
    ms, _, seq = raw.partition(b"-")
    return StreamId(int(ms), int(seq))
