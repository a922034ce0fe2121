"""Durable Streams streams, and apps' events in sessions: the Redis side of ``/ds/`` (api/http/ds).

A stream keeps a session's layout (`StreamKeys`): its messages are entries of a Redis stream, each naming
its predecessor, published on its channel as each is added, so the live engine reads and fans it out as it
does a session. A fork copies the messages it inherits (with their ids) when it is made, because its source
may live in another cluster slot and no script may read across slots; after that a fork stands alone, and
its source only counts it (``forks``) so that deleting the source answers 410 until its forks are gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

from tokenfan.contract.ids import new_epoch
from tokenfan.contract.keys import SessionKeys, StreamKeys, ds_owned_key, session_producers_key
from tokenfan.contract.offsets import StreamId
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, now_ms

__all__ = ["Copied", "Producer", "Streams"]

#: One inherited message of a fork: its id, its predecessor's id, its bytes.
Copied = tuple[bytes, bytes, bytes]


@dataclass(frozen=True, slots=True)
class Producer:
    """An idempotent producer's headers: id, epoch, seq."""

    id: str
    epoch: int
    seq: int

    def args(self) -> list[str | int]:
        return [self.id, self.epoch, self.seq]


_NO_PRODUCER: list[str | int] = ["", 0, 0]


class Streams(StoreCore):
    @storage_call
    async def stream_meta(self, keys: StreamKeys, *, touch: bool) -> dict[str, str] | None:
        """The stream's metadata (None: no such stream, or expired); `touch` renews a sliding TTL."""
        reply = await self.scripts.ds_meta(
            keys=[keys.meta, keys.events, keys.producers], args=["1" if touch else ""]
        )
        if not reply:
            return None
        return {reply[i].decode(): reply[i + 1].decode() for i in range(0, len(reply), 2)}

    @storage_call
    async def create_stream(
        self,
        keys: StreamKeys,
        fields: dict[str, str],
        *,
        last: StreamId,
        closed: bool,
        copied: list[Copied],
        own: list[bytes],
    ) -> StreamId | None:
        """Create the stream with its metadata `fields`; None when it exists already (the caller compares).
        `copied` are a fork's inherited messages, `own` its first own ones; `last` the id before those."""
        args: list[str | bytes | int] = [now_ms(), new_epoch(), len(fields)]
        for name, value in fields.items():
            args += [name, value]
        args += [str(last), "1" if closed else "", len(copied)]
        for entry in copied:
            args.extend(entry)
        args += [len(own), *own]
        reply = await self.scripts.ds_create(
            keys=[keys.meta, keys.events, keys.producers, keys.live], args=args
        )
        return StreamId.parse(reply[1]) if reply[0] == b"created" else None

    @storage_call
    async def append_stream(
        self,
        keys: StreamKeys,
        *,
        media_type: str,
        data: bytes,
        close: bool,
        stream_seq: str | None,
        producer: Producer | None,
    ) -> list[str]:
        """Append `data` (b"": none) and/or close; the script's reply (ds_append.lua), decoded."""
        args: list[str | bytes | int] = [media_type, data, "1" if close else "", stream_seq or ""]
        args += producer.args() if producer else _NO_PRODUCER
        reply = await self.scripts.ds_append(
            keys=[keys.meta, keys.events, keys.producers, keys.live], args=args
        )
        return [part.decode() for part in reply]

    @storage_call
    async def delete_stream(self, keys: StreamKeys, mode: str) -> tuple[str, str]:
        """``delete``, ``release`` (a fork of it went away) or ``retain`` (a fork is being made): the code
        and, when its keys went, the stream it was forked from ('' for none)."""
        reply = await self.scripts.ds_delete(keys=[keys.meta, keys.events, keys.producers], args=[mode])
        return reply[0].decode(), reply[1].decode()

    @storage_call
    async def inherited(self, keys: StreamKeys, upto: StreamId) -> list[Copied]:
        """The messages of the stream up to and including `upto`, for a fork of it (no close marker: a
        marker follows the last message, and a fork offset is never past it)."""
        copied: list[Copied] = []
        start = "-"
        while True:
            page = await self.redis.xrange(keys.events, start, str(upto), count=1024)
            for entry_id, fields in page:
                if fields[b"d"]:
                    copied.append((entry_id, fields[b"p"], fields[b"d"]))
            if len(page) < 1024:
                return copied
            start = "(" + page[-1][0].decode()

    @storage_call
    async def owned_count(self, owner: str, *, limit: int) -> int:
        """How many streams `owner` holds, exactly once it reaches `limit`: streams that expired (TTL) are
        forgotten then, so a key making many short-lived streams is not refused for streams long gone."""
        key = ds_owned_key(owner)
        count = int(await cast(Awaitable[int], self.redis.scard(key)))
        if count < limit:
            return count
        paths = [path.decode() for path in await cast(Awaitable[set[bytes]], self.redis.smembers(key))]
        gone: list[str] = []
        for start in range(0, len(paths), 256):
            chunk = paths[start : start + 256]
            held = await asyncio.gather(*(self.redis.exists(StreamKeys(path).meta) for path in chunk))
            gone += [path for path, exists in zip(chunk, held, strict=True) if not exists]
        if gone:
            await cast(Awaitable[int], self.redis.srem(key, *gone))
        return count - len(gone)

    @storage_call
    async def own(self, owner: str, path: str, *, owned: bool) -> None:
        """Count `path` among `owner`'s streams (or no longer), for the per-key stream limit."""
        key = ds_owned_key(owner)
        await cast(Awaitable[int], self.redis.sadd(key, path) if owned else self.redis.srem(key, path))

    @storage_call
    async def append_app_events(
        self, session_id: str, bodies: list[tuple[str, str]], producer: Producer | None
    ) -> list[str]:
        """Append apps' events to a session, each body given as the text before its seq and after it; the
        script's reply (app_event.lua), decoded."""
        keys = SessionKeys(session_id)
        args: list[str | int] = [now_ms(), new_epoch(), self.stream_max_length, self.session_ttl_seconds]
        args += producer.args() if producer else _NO_PRODUCER
        args.append(len(bodies))
        for before, after in bodies:
            args += [before, after]
        reply = await self.scripts.app_event(
            keys=[keys.events, keys.meta, keys.app, keys.live, session_producers_key(session_id)], args=args
        )
        return [part.decode() for part in reply]
