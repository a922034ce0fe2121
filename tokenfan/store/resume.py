"""The relay's side: where a subscriber may resume, and the stream's pages after that point.

Every entry names its predecessor (its field ``p``). `XTRIM` never updates a stream's
``max-deleted-entry-id``, so that link is what tells a page that follows on from one that skips entries
trimmed in between.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

from tokenfan.contract.errors import OffsetGone, UnknownOffset
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.keys import MetaField, SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, pairs
from tokenfan.store.records import PositionReply, ReadReply

__all__ = ["Resume"]


class Resume(StoreCore):
    @storage_call
    async def check_resume(self, session_id: str, offset: Offset | None) -> StreamId:
        """Validate where a subscriber wants to resume; return the stream id to read after.

        Raises `OffsetGone` when the offset's epoch is not the stream's (deleted and recreated, or expired)
        or when entries after it were trimmed, and `UnknownOffset` when it names no entry this stream had.
        Without an offset it still asks the session's node, so a subscriber learns at once (1013, 503) that
        storage is unreachable instead of waiting for it.
        """
        keys = SessionKeys(session_id)
        if offset is None:
            await self.redis.exists(keys.meta)
            return StreamId.ZERO
        reply = await self.scripts.position(
            keys=[keys.meta, keys.events], args=[offset.epoch, str(offset.stream_id)]
        )
        verdict = PositionReply(reply.decode())
        if verdict is PositionReply.RETAINED:
            return offset.stream_id
        if verdict is PositionReply.OTHER_EPOCH:
            raise OffsetGone("this offset belongs to an earlier incarnation of the session's stream; rebuild")
        if verdict is PositionReply.TRIMMED:
            raise OffsetGone("events after this offset are no longer retained; rebuild from a snapshot")
        raise UnknownOffset("no event of this session has this offset")

    @storage_call
    async def tail(self, session_id: str) -> tuple[bytes | None, StreamId]:
        """The session's epoch (None before its first generation) and newest entry id."""
        pending = self.redis.hmget(SessionKeys(session_id).meta, [MetaField.EPOCH, MetaField.LAST])
        epoch, last = await cast(Awaitable[list[bytes | None]], pending)
        return epoch, StreamId.parse(last) if last else StreamId.ZERO

    @storage_call
    async def read_after(
        self, session_id: str, after: StreamId, count: int, *, strict: bool = True
    ) -> list[StreamEntry]:
        """Up to `count` entries with ids strictly greater than `after`, oldest first.

        With `strict` (always, except when reading a session's retained history from its very start),
        raises `OffsetGone` when entries after `after` were trimmed: the page would not follow on.
        """
        reply = await self.scripts.read(
            keys=[SessionKeys(session_id).events],
            args=[str(after), count, 1 if strict and after != StreamId.ZERO else 0],
        )
        if ReadReply(reply[0].decode()) is ReadReply.GONE:
            raise OffsetGone("events after this position are no longer retained; rebuild from a snapshot")
        return [_entry(entry_id, pairs(fields)) for entry_id, fields in reply[1]]

    @storage_call
    async def read_before(
        self, session_id: str, through: StreamId, count: int
    ) -> tuple[list[StreamEntry], StreamId | None]:
        """Up to `count` entries with ids at or below `through`, oldest first, and the predecessor of the
        oldest (None when nothing was read): the stream holds every entry after that predecessor up to
        `through`, so a run read backwards this way follows on from it exactly, as `read_after`'s pages do."""
        reply = await self.scripts.read_back(
            keys=[SessionKeys(session_id).events], args=[str(through), count]
        )
        if not reply:
            return [], None
        return _flat_entries(reply), _id(reply[1])


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEntry:
    return StreamEntry(StreamId.parse(entry_id), fields[b"e"], fields[b"d"])


def _flat_entries(flat: list[bytes]) -> list[StreamEntry]:
    """The entries of a ``read_back`` reply (id, predecessor, epoch, body, four values each). Entries of one
    epoch share one `bytes` of it: a catch-up history holds thousands of them, and an epoch apiece was a
    seventh of what each cost."""
    entries = []
    epoch = b""
    for i in range(0, len(flat), 4):
        entry = _new(StreamEntry)
        _set_stream_id(entry, _id(flat[i]))
        if flat[i + 2] != epoch:
            epoch = flat[i + 2]
        _set_epoch(entry, epoch)
        _set_body(entry, flat[i + 3])
        entries.append(entry)
    return entries


def _id(raw: bytes) -> StreamId:
    """An entry id as Redis wrote it: two decimal numbers joined by a dash, already checked by Redis, so
    none of `StreamId.parse`'s checks of what a client sent (its regular expression was most of the time
    spent turning a page into entries)."""
    ms, _, seq = raw.partition(b"-")
    stream_id = _new(StreamId)
    _set_ms(stream_id, int(ms))
    _set_seq(stream_id, int(seq))
    return stream_id


# A page read back builds an entry and an id per entry. Through their frozen dataclasses' __init__ (an
# object.__setattr__ per field, looked up each time) that was 40% of turning a reply into entries; here
# their slots are set as that __init__ sets them, minus the lookups. Equal, hashed and frozen as ever
# (tests/store/test_resume.py compares them with entries built the ordinary way).
_new = object.__new__
_set_ms, _set_seq = (vars(StreamId)[name].__set__ for name in ("ms", "seq"))
_set_stream_id, _set_epoch, _set_body = (
    vars(StreamEntry)[name].__set__ for name in ("stream_id", "epoch", "body")
)
