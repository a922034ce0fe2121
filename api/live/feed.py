"""The shared reader: one `SessionFeed` per watched session per process, fed by the store's live tail.

However many subscribers watch a session in this process, its events reach the process once (the pub/sub
message the write script publishes), are turned into frames once, and each transport encodes a batch once
(`FrameBatch`), whatever the number of subscribers it is written to. Redis load therefore grows with
sessions, not with subscribers.

Pub/sub is at-most-once, so a feed never trusts it blindly: `FeedCursor` checks that each message follows the
last one delivered, and the feed reads any missed range from the stream itself before going on. After a
reconnect, every feed re-reads from its position. Subscribers catching up share the feed's reads and frames:
a burst of reconnects resuming from the same offset reads each page once. A feed whose last subscriber left
lingers for ``linger_seconds`` (a reconnecting client usually comes straight back), then stops watching.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

import structlog

from api.live.cursor import FeedCursor, Verdict
from api.live.frames import FrameBatch, FrameRun, snapshot_frame
from api.live.history import STEP, History, HistoryBudget
from api.live.metrics import LiveMetrics
from api.live.presence import publish_presence
from api.live.resume_checks import ResumeChecks
from api.live.subscription import State, Subscription
from tokenfan.contract.errors import OffsetGone, StorageUnavailable
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.ids import is_session_id
from tokenfan.contract.offsets import StreamId
from tokenfan.runtime.metrics import Metrics
from tokenfan.runtime.settings import Settings
from tokenfan.store import Store
from tokenfan.store.tail import LiveTail, Published

__all__ = ["LiveBus", "LiveSubscriber", "SessionFeed"]

log = structlog.get_logger("tokenfan.live.feed")

#: Catch-up pages whose frames a feed keeps while subscribers catch up (each page's frames: at most about
#: 100 KB with the default page size).
_PAGES_KEPT = 16
#: At most this many entries in a feed's catch-up history (`api.live.history`), about 4 MB of deltas; a
#: resumer further behind reads pages (`_read_forwards`) until it reaches the history. What all of a process's
#: histories hold together is bounded besides (`HistoryBudget`, ``TOKENFAN_CATCHUP_HISTORY_BUDGET``).
HISTORY_ENTRIES = 16_384
#: ``TOKENFAN_CATCHUP_HISTORY_BUDGET``'s default: six and a half full histories of benchmark-sized deltas (5 MB each).
HISTORY_BUDGET = 33_554_432
#: How long a feed keeps its catch-up history after its last resumer caught up. The resumers of a storm arrive
#: over tens of milliseconds (their handshakes queue up), so the first ones can catch up and go live before the
#: last ones ask: without this, each of those read the whole backlog again into a new history (in a storm of 100
#: resumes 5,000 behind, the backlog was read and merged twice). The history follows the feed meanwhile, within
#: the budget like any other.
HISTORY_LINGER_SECONDS = 2.0
#: Reads in flight from before its position a resumer waits for, one after another, before reading for itself
#: (each that ends before its position was someone else's page; a bound keeps a resumer from waiting on many).
_JOINS = 8
#: Frames of the history's shared answers kept (every step of a full history, and a few more).
_CHUNKS_KEPT = HISTORY_ENTRIES // STEP + 8
#: Entries of the history a resumer is handed at once (`SessionFeed.held_run`): a few writes for one thousands
#: of events behind.
RUN_ENTRIES = 2048
#: Runs kept, each by the position it follows: a storm's resumers at a few hundred offsets share theirs.
_RUNS_KEPT = 512


class LiveSink(Protocol):
    """What the feed calls on a subscriber's transport (`api.live.subscriber.Sink`) for a live batch."""

    def deliver(self, batch: FrameBatch) -> None:
        """Queue a live batch without waiting."""

    def buffered(self) -> int:
        """Bytes written and not yet taken by the client."""


class LiveSubscriber(Protocol):
    """What a feed needs from each of its live subscribers (`api.live.subscriber.Subscriber`).

    The feed delivers a batch itself to a subscriber in step with it that is not slow (`SessionFeed._fanout`),
    through its `core` and `sink`; any other gets `on_live_batch`."""

    @property
    def core(self) -> Subscription: ...

    @property
    def sink(self) -> LiveSink: ...

    @property
    def max_buffer_bytes(self) -> int: ...

    def on_live_batch(self, batch: FrameBatch, before: StreamId | None) -> int:
        """The feed delivers `batch`, which follows the entry `before`; returns the frames sent."""

    def on_reset(self, reason: str) -> None:
        """The stream was recreated, or trimmed past the subscriber: its offsets mean nothing any more."""


class SessionFeed:
    """The live tail of one session in this process."""

    def __init__(self, bus: LiveBus, session_id: str) -> None:
        self.bus = bus
        self.session_id = session_id
        self.cursor = FeedCursor(None, StreamId.ZERO)
        self.subscribers: dict[LiveSubscriber, None] = {}  # the live ones, in joining order
        self.references = 0
        self.ready = asyncio.Event()  # the cursor is known: subscribers may join
        self.frames_sent = 0  # frames written to subscribers (one frame to n subscribers counts n)
        self.linger: asyncio.TimerHandle | None = None
        self._pending: list[Published] = []
        self._repairing = False
        self._delivered: StreamId | None = None  # the last entry of the previous batch fanned out
        self._catching_up = 0  # subscribers reading pages now
        self._pages: dict[tuple[bytes, StreamId, StreamId, int], FrameBatch] = {}  # while any is
        self._reads: dict[tuple[StreamId, int], asyncio.Future[list[StreamEntry]]] = {}  # in flight
        self._chunks: dict[tuple[bytes, StreamId, StreamId, int], FrameBatch] = {}  # the history's
        self._runs: dict[StreamId, FrameRun] = {}  # the history's runs, by the position each follows
        self._history: History | None = None  # while any subscriber catches up, and a moment after
        self._history_linger: asyncio.TimerHandle | None = None  # that moment's end
        self._backfill: asyncio.Future[None] | None = None  # the history's read backwards in flight
        self._waiters: list[tuple[StreamId, asyncio.Future[None]]] = []  # resumers waiting for it

    @property
    def position(self) -> StreamId:
        return self.cursor.position

    def join(self, subscriber: LiveSubscriber) -> None:
        """Make a caught-up subscriber live. Must follow its last catch-up check with no await between."""
        self.subscribers[subscriber] = None

    def leave(self, subscriber: LiveSubscriber) -> None:
        self.subscribers.pop(subscriber, None)

    # --- shared by subscribers catching up

    @contextlib.contextmanager
    def catching_up(self) -> Iterator[None]:
        """Held while a subscriber reads pages: the history and the frames of shared pages are kept until
        nobody does, and for `LiveBus.history_linger_seconds` more."""
        if self._history_linger is not None:
            self._history_linger.cancel()
            self._history_linger = None
        if not self._catching_up and self._history is None:
            self._history = History(
                self.cursor.position, self.cursor.epoch, HISTORY_ENTRIES, budget=self.bus.history_budget
            )
        self._catching_up += 1
        try:
            yield
        finally:
            self._catching_up -= 1
            if not self._catching_up:
                linger = self.bus.history_linger_seconds
                if linger > 0:
                    self._history_linger = asyncio.get_running_loop().call_later(linger, self.drop_history)
                else:
                    self.drop_history()

    def drop_history(self) -> None:
        """Nobody has caught up for a while (or the feed stops): keep no history, and no frames of pages."""
        if self._history_linger is not None:
            self._history_linger.cancel()
            self._history_linger = None
        if not self._catching_up:
            self._pages.clear()
            self._chunks.clear()
            self._forget_history()

    async def read_page(self, after: StreamId) -> list[StreamEntry]:
        """The entries after `after`, a contiguous run of them, read after the subscription's resume point
        was validated, which is all catch-up needs (a page that ends early only means one more read).

        From the feed's history when it covers `after`, or can be read backwards until it does: then every
        entry is read from Redis once, whatever the offsets of the resumers. Otherwise `Store.read_after`,
        with the reads of subscribers at the same position at the same time shared: one that asks while an
        identical read is in flight waits for that one."""
        await self.grow_back_to(after)
        history = self._history
        if history is not None and history.covers(after):
            return history.chunk(after)
        return await self._read_forwards(after)

    async def grow_back_to(self, after: StreamId) -> None:
        """Wait until the history covers `after`, or can grow back to it no further (or there is none)."""
        history = self._history
        while history is not None and history.can_grow_back_to(after):
            await self._grown_back(after, history)
            history = self._history

    def held_run(self, after: StreamId) -> FrameRun | None:
        """What the history holds right after `after`, up to about `RUN_ENTRIES` entries, as the batches a
        resumer sends at once (nothing to wait for); None when it holds nothing after it.

        Made once for every resumer at `after`: the hundred resumers of a storm at one offset each walked the
        same twenty chunks, a sixth of the relay's CPU in the storm. Past their first run, resumers at
        different offsets meet at the history's cuts and share runs too."""
        run = self._runs.get(after)
        if run is not None:
            return run
        history = self._history
        if history is None or not history.covers(after):
            return None
        batches, taken, position = [], 0, after
        while taken < RUN_ENTRIES:
            chunk = history.chunk(position)
            if not chunk:
                break
            batches.append(self.page_batch(chunk))
            taken += len(chunk)
            position = chunk[-1].stream_id
        if not batches:
            return None
        run = self._runs[after] = FrameRun(batches)
        if len(self._runs) > _RUNS_KEPT:
            del self._runs[next(iter(self._runs))]
        return run

    async def _grown_back(self, after: StreamId, history: History) -> None:
        """Wait until the history covers `after`, or can grow back to it no further (or is dropped). One
        read backwards at a time, page after page, shared by every waiting resumer, and each resumer woken
        once, when it is covered, rather than once per page (a storm of a hundred resumers 5,000 events
        behind was a thousand wake-ups)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((after, waiter))
        backfill = self._backfill
        if backfill is None or backfill.done():
            backfill = self._backfill = asyncio.ensure_future(self._read_backwards(history))
            backfill.add_done_callback(_retrieved)
        await waiter  # a resumer that leaves cancels its own wait only: the read goes on for the others

    async def _read_backwards(self, history: History) -> None:
        """Read pages backwards into `history` while a resumer waits for an entry it does not hold yet."""
        try:
            while history is self._history and self._waiting_for(history):
                self.bus.metrics.pages.inc()
                try:
                    run, predecessor = await self.bus.store.read_before(
                        self.session_id, history.after, self.bus.page_size
                    )
                except BaseException:
                    history.stuck = True  # the waiting readers go forwards, and meet the error themselves
                    raise
                history.prepend(run, predecessor)
        finally:
            self._waiting_for(None)

    def _waiting_for(self, history: History | None) -> bool:
        """Wake the waiting resumers that `history` covers or cannot grow back to (None: every one); whether
        any is left waiting for it to grow."""
        waiting = []
        for position, waiter in self._waiters:
            if waiter.done():
                continue
            if history is not None and history.can_grow_back_to(position):
                waiting.append((position, waiter))
            else:
                waiter.set_result(None)
        self._waiters = waiting
        return bool(waiting)

    async def _read_forwards(self, after: StreamId) -> list[StreamEntry]:
        """A page after `after`, read from Redis. A read in flight from `after` or from before it is waited
        for rather than repeated: when its page reaches past `after`, what follows `after` in it is exactly
        what a read from `after` would return (a page is every entry after its start, up to its last). A storm
        of resumers at many offsets beyond the history thus reads each page once for all the resumers it
        covers, not once per resumer, and they go on together from its end (the same read, shared)."""
        for _ in range(_JOINS):
            joined = self._read_in_flight_before(after)
            if joined is None:
                break
            with contextlib.suppress(Exception):  # its failure is its reader's; ours comes from our own read
                page = await asyncio.shield(joined)
                if page and page[-1].stream_id > after:
                    return page[bisect.bisect_right(page, after, key=_stream_id) :]
        key = (after, self.bus.page_size)
        pending = self._reads.get(key)
        if pending is None:
            self.bus.metrics.pages.inc()
            pending = asyncio.ensure_future(self.bus.store.read_after(self.session_id, after, key[1]))
            self._reads[key] = pending
            pending.add_done_callback(functools.partial(self._read_done, key))
        return await asyncio.shield(pending)  # one reader's cancellation leaves the others' read alone

    def _read_in_flight_before(self, after: StreamId) -> asyncio.Future[list[StreamEntry]] | None:
        """The read in flight from the latest position at or before `after`, if any."""
        best: tuple[StreamId, asyncio.Future[list[StreamEntry]]] | None = None
        for (start, size), pending in self._reads.items():
            if size == self.bus.page_size and start <= after and (best is None or start > best[0]):
                best = start, pending
        return best[1] if best is not None else None

    def _read_done(self, key: tuple[StreamId, int], read: asyncio.Future[list[StreamEntry]]) -> None:
        if self._reads.get(key) is read:
            del self._reads[key]
        _retrieved(read)

    def page_batch(self, entries: list[StreamEntry]) -> FrameBatch:
        """A catch-up page as a `FrameBatch`: its frames merged, and each transport's encoding of them made,
        once for every subscriber catching up over the same range. A page is a contiguous run of one stream
        incarnation, so its epoch, first and last id and length identify its entries exactly. The history's
        shared answers (chunks and steps) are kept apart from other pages (a resumer's first, partial one is
        its own, and a storm of them would push the shared ones out)."""
        if len(entries) < 2:
            return FrameBatch(entries)
        key = (entries[0].epoch, entries[0].stream_id, entries[-1].stream_id, len(entries))
        batch = self._chunks.get(key) or self._pages.get(key)
        if batch is None:
            batch = FrameBatch(entries)
            whole = self._history is not None and self._history.starts_step(entries[0].stream_id)
            kept, limit = (self._chunks, _CHUNKS_KEPT) if whole else (self._pages, _PAGES_KEPT)
            kept[key] = batch
            if len(kept) > limit:
                del kept[next(iter(kept))]
        return batch

    async def snapshot_after(self, position: StreamId, reason: str) -> tuple[bytes, StreamId] | None:
        """A ``snapshot`` frame of every generation that changed after `position`, and the position it is
        consistent with (catch up after it); None when the session's stream is gone."""
        snapshot = await self.bus.store.snapshot(self.session_id, since=position)
        if snapshot is None or snapshot.offset is None:
            return None
        generations = [record.as_json() for record in snapshot.generations]
        frame = snapshot_frame(self.session_id, str(snapshot.offset), generations, reason)
        return frame, snapshot.offset.stream_id

    # --- driven by the live tail (`TailListener`)

    def on_subscribed(self) -> None:
        """Our channel subscription is confirmed: anything appended from now on will be published to us,
        so reading the position now (first time) or repairing from it (after a reconnect) misses nothing."""
        self._start_repair(initial=not self.ready.is_set(), cause="resubscribed")

    def on_published(self, entries: list[Published]) -> None:
        if not self.ready.is_set() or self._repairing:
            self._pending.extend(entries)
            return
        self._process(entries)

    def _process(self, messages: list[Published]) -> None:
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
                self._start_repair(initial=False, cause="gap")
                return
        self._fanout(run)

    def _reset(self, epoch: bytes) -> None:
        log.warning("stream_reset", session_id=self.session_id)
        self._forget_history()
        self._delivered = None
        self.cursor.reset(epoch)
        self._reset_subscribers("the session's stream was recreated; rebuild from a snapshot")

    def _skip_trimmed(self, position: StreamId) -> None:
        """We fell so far behind that the stream dropped entries we never delivered: nobody may resume from
        our position any more."""
        self._reset_subscribers("events were trimmed before they could be delivered; rebuild from a snapshot")
        self._forget_history()
        self._delivered = None
        self.cursor.skip_to(position)
        self.ready.set()

    def _reset_subscribers(self, reason: str) -> None:
        for subscriber in list(self.subscribers):
            subscriber.on_reset(reason)
        self.subscribers.clear()

    def _start_repair(self, *, initial: bool, cause: str) -> None:
        if not self._repairing:
            self._repairing = True
            if not initial:
                self.bus.metrics.repairs.labels(cause).inc()
            self.bus.spawn(self._repair(initial))

    async def _repair(self, initial: bool) -> None:
        try:
            if initial:
                epoch, last = await self.bus.store.tail(self.session_id)
                self.cursor = FeedCursor(epoch, last)
            else:
                await self._read_missed()
        except OffsetGone:
            self._repairing = False
            with contextlib.suppress(StorageUnavailable):  # else the next message starts another repair
                _, last = await self.bus.store.tail(self.session_id)
                self._skip_trimmed(last)
            return
        except StorageUnavailable as exc:
            # The tail reconnects and calls on_subscribed again, which retries this.
            log.warning("feed_repair_failed", session_id=self.session_id, error=str(exc.__cause__))
            self._repairing = False
            return
        self._repairing = False
        self.ready.set()
        pending, self._pending = self._pending, []
        if pending:
            self._process(pending)

    async def _read_missed(self) -> None:
        while True:
            page = await self.bus.store.read_after(self.session_id, self.cursor.position, self.bus.page_size)
            if page and self.cursor.epoch is not None and page[-1].epoch != self.cursor.epoch:
                self._reset(page[-1].epoch)
                continue
            self._fanout(self.cursor.advance(page))
            if len(page) < self.bus.page_size:
                return

    def _forget_history(self) -> None:
        """Nobody catches up any more, or the stream's ids start over (or jump): keep no history of the old
        ones (catch-ups read pages), and give back to the budget what it held."""
        history, self._history = self._history, None
        self._runs.clear()
        if history is not None:
            history.release()

    def _fanout(self, entries: list[StreamEntry]) -> None:
        if not entries:
            return
        history = self._history
        if history is not None:
            after = history.after
            history.append(entries)
            if history.after is not after:  # its oldest entries went: so do the frames made of them
                self._chunks = {key: batch for key, batch in self._chunks.items() if key[1] > history.after}
                self._runs = {key: run for key, run in self._runs.items() if key >= history.after}
        before, self._delivered = self._delivered, entries[-1].stream_id
        if not self.subscribers:
            return
        batch = FrameBatch(entries)
        last = entries[-1].stream_id
        sent = whole = 0
        live = State.LIVE
        for subscriber in list(self.subscribers):
            # The common case, thousands of times per batch, made here: a live subscription in step with the
            # feed (its position is the very id object the previous batch ended with) takes all of the batch,
            # as `Subscription.on_live` would say, unless it is slow. Going through `on_live_batch` for each
            # (two more calls of ours per subscriber) cost a sixth of the relay's CPU per frame.
            core, sink = subscriber.core, subscriber.sink
            if (
                core.position is before
                and core.state is live
                and sink.buffered() <= subscriber.max_buffer_bytes
            ):
                core.position = last
                sink.deliver(batch)
                whole += 1
            else:  # slow, behind, ahead (it read past the feed while catching up), or not live
                sent += subscriber.on_live_batch(batch, before)
        if whole:
            sent += whole * len(batch.frames)
        self.frames_sent += sent
        self.bus.metrics.fanned_out(batch, sent)


def _stream_id(entry: StreamEntry) -> StreamId:
    return entry.stream_id


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a shared read's error as retrieved: every waiter may have been cancelled."""
    if not future.cancelled():
        future.exception()


class LiveBus:
    """The process's feeds, over one live tail. Start with `start()`, end with `close()`."""

    def __init__(
        self,
        store: Store,
        tail: LiveTail,
        *,
        page_size: int = 512,
        linger_seconds: float = 5.0,
        presence_interval: float | None = None,
        metrics: LiveMetrics | None = None,
        history_budget: int = HISTORY_BUDGET,
        history_linger_seconds: float = HISTORY_LINGER_SECONDS,
    ) -> None:
        self.store = store
        #: Resume checks, shared by subscribers resuming from the same offset at the same time.
        self.checks = ResumeChecks(store)
        self.metrics = metrics or LiveMetrics(Metrics("live", enabled=False))
        #: What every feed's catch-up history may hold together (approximate bytes).
        self.history_budget = HistoryBudget(history_budget)
        self.history_linger_seconds = history_linger_seconds
        self.tail = tail
        self.page_size = page_size
        self.linger_seconds = linger_seconds
        self.presence_interval = presence_interval
        self.feeds: dict[str, SessionFeed] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.metrics.feeds.set_function(lambda: len(self.feeds))  # len(): atomic for the scrape's thread
        self.metrics.history_bytes.set_function(lambda: self.history_budget.held)

    @classmethod
    def from_settings(cls, store: Store, settings: Settings, metrics: Metrics | None = None) -> LiveBus:
        """The bus of a relay or API process: its own pub/sub connection, presence claims, and its
        instruments on the process's `metrics`."""
        return cls(
            store,
            LiveTail(store.topology),
            page_size=settings.relay_catchup_page_size,
            linger_seconds=settings.feed_linger_seconds,
            presence_interval=settings.presence_interval_seconds,
            metrics=LiveMetrics(metrics) if metrics is not None else None,
            history_budget=settings.catchup_history_budget,
        )

    def start(self, watch: Callable[[asyncio.Task[None]], None] | None = None) -> None:
        """Start claiming the sessions this process serves, for its life; `watch` is given that task
        (`tokenfan.runtime.serving.Lifelong.watch`: a process whose claims stopped must not serve on)."""
        if self.presence_interval is not None:
            task = self.spawn(publish_presence(self.watching, self.store, interval=self.presence_interval))
            task.set_name("presence")
            if watch is not None:
                watch(task)

    def watching(self) -> dict[str, int]:
        """The sessions this process has subscribers of now, and how many. A Durable Streams stream's feed
        (``ds:<path>``, never a session id) is left out: no generation waits on who watches it."""
        return {
            name: feed.references
            for name, feed in self.feeds.items()
            if feed.references > 0 and is_session_id(name)
        }

    async def close(self) -> None:
        await self.tail.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def acquire(self, session_id: str) -> SessionFeed:
        """The feed of `session_id`, ready to be joined. Pair every call with `release`."""
        feed = self.feeds.get(session_id)
        if feed is None:
            feed = self.feeds[session_id] = SessionFeed(self, session_id)
            feed.references += 1
            watching = self.tail.watch(session_id, feed)
        else:
            if feed.linger is not None:
                feed.linger.cancel()
                feed.linger = None
            feed.references += 1
            watching = None
        try:
            if watching is not None:
                await watching
            await feed.ready.wait()
        except BaseException:
            self.release(feed)
            raise
        return feed

    def release(self, feed: SessionFeed) -> None:
        feed.references -= 1
        if feed.references == 0:
            feed.linger = asyncio.get_running_loop().call_later(self.linger_seconds, self._drop, feed)

    def _drop(self, feed: SessionFeed) -> None:
        if feed.references > 0 or self.feeds.get(feed.session_id) is not feed:
            return
        del self.feeds[feed.session_id]
        feed.drop_history()
        self.tail.unwatch(feed.session_id)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task
