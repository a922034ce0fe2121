"""Offsets: the opaque resume positions clients hold.

An offset is ``<epoch>:<ms>-<seq>``: the Redis Stream entry id of an event prefixed with the epoch of the
stream incarnation that holds it. When a session's stream is deleted (expiry) and later recreated, it gets
a new epoch, so an offset from the old incarnation can never silently resume at a wrong place: comparing
epochs tells the two apart. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Self

from tokenfan.contract.errors import InvalidOffset

__all__ = ["EPOCH_PATTERN", "OFFSET_MAX_LENGTH", "OFFSET_PATTERN", "Offset", "StreamId", "parse_offset"]

EPOCH_PATTERN = r"[0-9a-z]{1,16}"
#: The grammar of an offset a client sends back, as the API's schema states it: an epoch, then an entry id
#: of 1-19 digits each. [0-9], not \d: \d matches every Unicode digit, and int() would accept them too. 19
#: digits keep every offset the grammar allows within Redis's 64-bit ids (the stream's ids are milliseconds
#: and a counter: 13 digits and a few), so no well-formed offset is refused for its size.
OFFSET_PATTERN = rf"^{EPOCH_PATTERN}:[0-9]{{1,19}}-[0-9]{{1,19}}$"
OFFSET_MAX_LENGTH = 64
_OFFSET = re.compile(rf"^({EPOCH_PATTERN}):([0-9]{{1,19}})-([0-9]{{1,19}})$")
_STREAM_ID = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")
_U64 = (1 << 64) - 1


@dataclass(frozen=True, order=True, slots=True)
class StreamId:
    """A Redis Stream entry id; ordered the way Redis orders entries."""

    ms: int
    seq: int

    ZERO: ClassVar[StreamId]  # set below; the id before every entry

    @classmethod
    def parse(cls, text: str | bytes) -> Self:
        raw = text.decode() if isinstance(text, bytes) else text
        match = _STREAM_ID.fullmatch(raw)
        if match is None:
            raise InvalidOffset(f"not a stream id: {raw[:40]!r}")
        ms, seq = int(match.group(1)), int(match.group(2))
        if ms > _U64 or seq > _U64:
            raise InvalidOffset("stream id out of range")
        return cls(ms, seq)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


StreamId.ZERO = StreamId(0, 0)


@dataclass(frozen=True, slots=True)
class Offset:
    """A position in one incarnation (epoch) of a session's stream."""

    epoch: str
    stream_id: StreamId

    def __str__(self) -> str:
        return f"{self.epoch}:{self.stream_id}"


def parse_offset(text: str) -> Offset:
    """Parse an offset a client sent; raises `InvalidOffset` (HTTP 400 / close 4400) when malformed."""
    if len(text) > OFFSET_MAX_LENGTH:
        raise InvalidOffset("offset too long")
    match = _OFFSET.fullmatch(text)
    if match is None:
        raise InvalidOffset("offset must look like '<epoch>:<ms>-<seq>', as received in an event")
    return Offset(match.group(1), StreamId(int(match.group(2)), int(match.group(3))))
