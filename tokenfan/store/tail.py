"""The live tail: sharded pub/sub carrying, to this process, every entry appended to the sessions it watches.

The write script publishes each appended entry with SPUBLISH on its session's shard channel
(``tf:{S}:live``, in the session's slot) as ``<epoch> <id of the previous entry> <id> <body>``. A message
goes only to the node that owns the slot, so a cluster does not broadcast every token to every node. This
process holds one subscription connection per node it needs (`_Shard`), not one per session; on one Redis
that is one connection.

Pub/sub is at-most-once: a listener must check that each entry follows the one before (it names its
predecessor for that) and read what it missed from the stream. Whenever a channel's subscription is
confirmed (first, or again after a reconnect, a failover or a slot that moved), its listener hears
`on_subscribed`: from that instant everything appended reaches it, so it re-reads from its position and
misses nothing. Messages that arrive together (one read of the socket) reach each listener as one batch.

Why our own reader rather than redis-py's pub/sub: its asyncio cluster client has no pub/sub at all, and its
asyncio `PubSub` knows no sharded commands (redis-py 5, which arq requires). A plain connection per node,
speaking SSUBSCRIBE and reading the pushed replies, is all that is needed (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from tokenfan.contract.events import StreamEntry
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import StreamId
from tokenfan.store.boundary import count_failure
from tokenfan.store.connection import ANSWER_SECONDS
from tokenfan.store.slots import key_slot
from tokenfan.store.topology import Topology

__all__ = ["LiveTail", "Published", "TailListener"]

log = structlog.get_logger("tokenfan.store.tail")

#: One published entry and the id of the entry before it.
Published = tuple[StreamEntry, StreamId]

#: A shard connection pings its node this often, and is dead once it has heard nothing at all (not even the
#: answer to a ping) for `ANSWER_SECONDS`: a node that hangs is noticed within about 5 s, as the worker and
#: the cluster client notice it, so its sessions are subscribed again on the promoted replica then rather than
#: half a minute later. One PING per second per node is nothing to Redis.
_PING_SECONDS = 1.0


class TailListener(Protocol):
    """What the tail calls for one watched session."""

    def on_subscribed(self) -> None:
        """The channel's subscription is confirmed (again): read from your position."""

    def on_published(self, entries: list[Published]) -> None:
        """Entries published on the channel, in the order Redis sent them."""


class LiveTail:
    """The process's live subscriptions. `watch` sessions; `close()` at the end."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._listeners: dict[bytes, TailListener] = {}
        self._shards: dict[str, _Shard] = {}
        self._homeless: set[bytes] = set()
        self._rehoming: asyncio.Task[None] | None = None
        self._batch: dict[TailListener, list[Published]] = {}
        #: Each channel's epoch as last published: its entries share that one `bytes`, as catch-up pages' do
        #: (`tokenfan.store.resume`), rather than one apiece in every history that keeps them.
        self._epochs: dict[bytes, bytes] = {}
        self._flush_scheduled = False
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._rehoming is not None:
            self._rehoming.cancel()
        for shard in list(self._shards.values()):
            await shard.close()

    async def watch(self, session_id: str, listener: TailListener) -> None:
        """Subscribe `listener` to the session's channel. It hears `on_subscribed` once the subscription
        holds (and again after every reconnect); while Redis is unreachable, that is later."""
        channel = SessionKeys(session_id).live.encode()
        self._listeners[channel] = listener
        try:
            await self.topology.ready()
        except (RedisError, OSError):
            self._lost(None, [channel])
            return
        await self._place([channel])

    def unwatch(self, session_id: str) -> None:
        channel = SessionKeys(session_id).live.encode()
        self._listeners.pop(channel, None)
        self._epochs.pop(channel, None)
        self._homeless.discard(channel)
        for shard in self._shards.values():
            shard.remove(channel)

    async def _place(self, channels: Iterable[bytes]) -> None:
        by_node: dict[str, list[bytes]] = defaultdict(list)
        for channel in channels:
            if channel in self._listeners:
                by_node[self.topology.node_of(key_slot(channel))].append(channel)
        for node, placed in by_node.items():
            shard = self._shards.get(node)
            if shard is None or shard.closed:
                shard = self._shards[node] = _Shard(self, node)
            await shard.add(placed)

    def _lost(self, shard: _Shard | None, channels: Iterable[bytes]) -> None:
        """`channels` lost their subscription (their node failed, or their slot moved): subscribe them
        again wherever the reloaded slot map says, with backoff, until it works."""
        if shard is not None and shard.closed and self._shards.get(shard.node) is shard:
            del self._shards[shard.node]
        if self._closed:
            return
        self._homeless.update(channel for channel in channels if channel in self._listeners)
        if self._homeless and (self._rehoming is None or self._rehoming.done()):
            self._rehoming = asyncio.get_running_loop().create_task(self._rehome())

    async def _rehome(self) -> None:
        backoff = 0.05
        while self._homeless:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            channels, self._homeless = self._homeless, set()
            try:
                await self.topology.refresh()
                await self._place(channels)
            except (RedisError, OSError) as exc:
                count_failure("live_tail", exc)
                log.warning("live_tail_reconnecting", error=str(exc), backoff_s=backoff)
                self._homeless |= {channel for channel in channels if channel in self._listeners}

    # --- replies of the shard connections

    def _subscribed(self, channel: bytes) -> None:
        listener = self._listeners.get(channel)
        if listener is not None:
            listener.on_subscribed()

    def _published(self, channel: bytes, data: bytes) -> None:
        listener = self._listeners.get(channel)
        if listener is None:
            return
        epoch, previous, entry_id, body = data.split(b" ", 3)
        known = self._epochs.get(channel)
        if known == epoch:
            epoch = known
        else:
            self._epochs[channel] = epoch
        self._batch.setdefault(listener, []).append(
            (StreamEntry(_stream_id(entry_id), epoch, body), _stream_id(previous))
        )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._batch = self._batch, {}
        for listener, entries in batch.items():
            listener.on_published(entries)


class _Shard:
    """One subscription connection to one node, for the channels of the slots that node serves."""

    def __init__(self, tail: LiveTail, node: str) -> None:
        self.tail = tail
        self.node = node
        self.channels: set[bytes] = set()
        self.closed = False
        self._connection: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._heard = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawn(self._run())

    async def add(self, channels: list[bytes]) -> None:
        fresh = [channel for channel in channels if channel not in self.channels]
        self.channels.update(fresh)
        if self._connected.is_set():
            await self._send(*(("SSUBSCRIBE", channel) for channel in fresh))
        # else: `_run` subscribes every channel of the shard once connected

    def remove(self, channel: bytes) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            if self._connected.is_set():
                self._spawn(self._send(("SUNSUBSCRIBE", channel)))

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        try:
            pool = self.tail.topology.client(self.node).connection_pool
            # No health check: its PING would read a reply meant for `_read` (`_ping` does that job).
            options = {**pool.connection_kwargs, "health_check_interval": 0}
            connection = self._connection = pool.connection_class(**options)
            async with asyncio.timeout(ANSWER_SECONDS):  # a hung node accepts, and then never answers AUTH
                await connection.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            self._connected.set()
            await self._send(*(("SSUBSCRIBE", channel) for channel in self.channels))
            self._spawn(self._ping(connection))
            await self._read(connection)
        except (RedisError, OSError, ValueError) as exc:
            count_failure("live_tail", exc)
            log.warning("live_tail_shard_lost", node=self.node, error=str(exc))
        finally:
            self.closed = True
            self._connected.clear()
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.disconnect()
            self.tail._lost(self, self.channels)

    async def _read(self, connection: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            reply = await connection.read_response(disconnect_on_error=True)
            self._heard = loop.time()
            if not isinstance(reply, list) or len(reply) < 3:
                continue  # PONG
            kind, channel = reply[0], reply[1]
            if kind == b"smessage":
                self.tail._published(channel, reply[2])
            elif kind == b"ssubscribe" and channel in self.channels:
                self.tail._subscribed(channel)
            elif kind == b"sunsubscribe" and channel in self.channels:
                # Not ours to end: the slot moved to another node (a resharding or a failover).
                self.channels.discard(channel)
                self.tail._lost(self, [channel])

    async def _ping(self, connection: AbstractConnection) -> None:
        """A node that hangs, or a connection cut without a reset (a partition), would leave the shard waiting
        forever: ping it, and drop it when even the answer does not come."""
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        while True:
            await asyncio.sleep(_PING_SECONDS)
            if loop.time() - self._heard > ANSWER_SECONDS:
                await connection.disconnect()
                return
            with contextlib.suppress(RedisError, OSError):
                await connection.send_command("PING", check_health=False)

    async def _send(self, *commands: tuple[str, bytes]) -> None:
        connection = self._connection
        if connection is None or not commands:
            return
        with contextlib.suppress(RedisError, OSError):  # the read side sees the failure and reconnects
            await connection.send_packed_command(connection.pack_commands(list(commands)), check_health=False)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _stream_id(raw: bytes) -> StreamId:
    """An entry id as the write script publishes it (Redis's own ``<ms>-<seq>``): `StreamId.parse` minus its
    validation of untrusted input."""
    ms, _, seq = raw.partition(b"-")
    return StreamId(int(ms), int(seq))
