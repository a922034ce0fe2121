"""Snapshots: a session's generations, consistent with an offset of its stream.

The snapshot script reads only the generations whose keys it is given, so the store first reads which
generations there are, and the script checks that the list still holds them, and that any generation
accepted since waits behind the queue's head (it has no event yet: the snapshot is the session as it was
just before it arrived). Otherwise it answers ``stale``, and the store reads the list again. A snapshot of
everything reads the whole list. A snapshot of what changed after an entry id (a subscriber skipping its
backlog) needs only the newest few generations: it starts with a small window, and widens it when the
script answers that older generations may have changed too (``more``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, cast

from tokenfan.contract.errors import ServiceUnavailable
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, pairs
from tokenfan.store.records import GenerationRecord, SessionSnapshot, SnapshotReply

__all__ = ["Snapshots"]

#: Generations a snapshot after an entry id reads first: one running and a few finished ones around it.
_FIRST_WINDOW = 8
#: How much wider each further window is.
_WIDEN = 8
#: Reads of the generations list a snapshot makes at most: the widening steps up to the longest list kept,
#: plus a few retries after a generation started or ended between a read and its script call.
_ROUNDS = 10


class Snapshots(StoreCore):
    @storage_call
    async def snapshot(self, session_id: str, since: StreamId | None = None) -> SessionSnapshot | None:
        """The session's retained generations (or those with events after `since`), consistent with the
        returned offset: the state is exactly the state after the event at that offset. None when the
        session has no stream yet. Raises `ServiceUnavailable` (503, try again) in the unlikely case that
        the session changed under each of several reads."""
        keys = SessionKeys(session_id)
        window = None if since is None else _FIRST_WINDOW
        for _ in range(_ROUNDS):
            ids = await self._newest_generations(keys, window)
            reply = await self.scripts.snapshot(
                keys=_snapshot_keys(keys, ids), args=[str(since) if since else "", *ids]
            )
            code = SnapshotReply(reply[0].decode())
            if code is SnapshotReply.OK:
                return _snapshot(session_id, reply)
            if code is SnapshotReply.MORE:  # (only ever the answer to a window)
                window = (window or _FIRST_WINDOW) * _WIDEN
        raise ServiceUnavailable("the session kept changing while its snapshot was read")

    async def _newest_generations(self, keys: SessionKeys, window: int | None) -> list[str]:
        """The ids at the end of the session's generations list, oldest first: `window` of them, or all."""
        pending = self.redis.lrange(keys.generations, -window if window else 0, -1)
        return [raw.decode() for raw in await cast(Awaitable[list[bytes]], pending)]


def _snapshot_keys(keys: SessionKeys, ids: Sequence[str]) -> list[str]:
    names = [keys.meta, keys.generations, keys.queue]
    for generation_id in ids:
        names += [
            keys.generation(generation_id),
            keys.generation_text(generation_id),
            keys.generation_reasoning(generation_id),
        ]
    return names


def _snapshot(session_id: str, reply: list[Any]) -> SessionSnapshot | None:
    epoch, last = reply[1].decode(), reply[2].decode()
    if not epoch:
        return None
    records = [
        GenerationRecord.from_fields(
            session_id, reply[i].decode(), pairs(reply[i + 1]), reply[i + 2], reply[i + 3]
        )
        for i in range(3, len(reply), 4)
    ]
    offset = Offset(epoch, StreamId.parse(last)) if last != "0-0" else None
    return SessionSnapshot(session_id, offset, records)
