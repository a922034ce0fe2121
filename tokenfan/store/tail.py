"""The live tail: one Redis pub/sub connection per process, carrying every entry appended to the sessions
this process watches.

The write script publishes each appended entry on its session's channel as
``<epoch> <id of the previous entry> <id> <body>``. Pub/sub is at-most-once: a listener must check that each
entry follows the one before (it names its predecessor for that) and read what it missed from the stream.
After a reconnect every channel is subscribed again, and each listener hears `on_subscribed` again: from
that instant, everything appended reaches it, so it re-reads from its position and misses nothing.

Messages that arrive together (one read of the socket) reach each listener as one batch, so a busy session's
listener handles a run of entries at once instead of one call per entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from tokenfan.contract.events import StreamEntry
from tokenfan.contract.keys import RELAY_IDLE_CHANNEL, SessionKeys
from tokenfan.contract.offsets import StreamId

__all__ = ["LiveTail", "Published", "TailListener"]

log = structlog.get_logger("tokenfan.store.tail")

#: One published entry and the id of the entry before it.
Published = tuple[StreamEntry, StreamId]

#: Keeps the connection in subscribe mode while no session is watched.
_IDLE_CHANNEL = RELAY_IDLE_CHANNEL.encode()


class TailListener(Protocol):
    """What the tail calls for one watched session."""

    def on_subscribed(self) -> None:
        """The channel's subscription is confirmed (again, after a reconnect): read from your position."""

    def on_published(self, entries: list[Published]) -> None:
        """Entries published on the channel, in the order Redis sent them."""


class LiveTail:
    """Owns the process's pub/sub connection. `start()` it, `watch` sessions, `close()` it at the end."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._listeners: dict[bytes, TailListener] = {}
        self._pubsub: PubSub | None = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch: dict[TailListener, list[Published]] = {}  # read, not yet handed over
        self._flush_scheduled = False

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="live-tail")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def watch(self, session_id: str, listener: TailListener) -> None:
        """Subscribe `listener` to the session's channel; waits while Redis is unreachable. The listener
        hears `on_subscribed` once the subscription holds (and again after every reconnect)."""
        channel = SessionKeys(session_id).live.encode()
        self._listeners[channel] = listener
        await self._connected.wait()
        assert self._pubsub is not None
        with contextlib.suppress(RedisError, OSError):  # the reader reconnects and subscribes it again
            await self._pubsub.subscribe(channel)

    def unwatch(self, session_id: str) -> None:
        channel = SessionKeys(session_id).live.encode()
        if self._listeners.pop(channel, None) is not None and self._connected.is_set():
            task = asyncio.get_running_loop().create_task(self._unsubscribe(channel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unsubscribe(self, channel: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):
            if self._pubsub is not None and channel not in self._listeners:
                await self._pubsub.unsubscribe(channel)

    async def _read_forever(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(_IDLE_CHANNEL, *self._listeners)
                self._pubsub = pubsub
                self._connected.set()
                backoff = 0.05
                await self._read(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("live_tail_reconnecting", error=str(exc), backoff_s=backoff)
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
            # once everything that arrived has been read. The batch is handed over then: what arrived
            # together reaches each listener as one run, without a timed read per message.
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
            self._route(message)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._batch = self._batch, {}
        for listener, entries in batch.items():
            listener.on_published(entries)

    def _route(self, message: dict[str, object]) -> None:
        channel = message.get("channel")
        listener = self._listeners.get(channel) if isinstance(channel, bytes) else None
        if listener is None:
            return
        kind = message.get("type")
        if kind == "subscribe":
            listener.on_subscribed()
        elif kind == "message":
            data = message.get("data")
            if isinstance(data, bytes):
                epoch, previous, entry_id, body = data.split(b" ", 3)
                entry = StreamEntry(_stream_id(entry_id), epoch, body)
                self._batch.setdefault(listener, []).append((entry, _stream_id(previous)))


def _stream_id(raw: bytes) -> StreamId:
    """An entry id as the write script publishes it (Redis's own ``<ms>-<seq>``): `StreamId.parse` minus its
    validation of untrusted input."""
    ms, _, seq = raw.partition(b"-")
    return StreamId(int(ms), int(seq))
