"""The shared reader's position in one session's stream, and its verdict on each published entry. Pure.

Each entry a writer publishes names its predecessor. An entry whose predecessor is the cursor's position is
next in line; one at or below the position was already delivered; any other one means messages were missed
(pub/sub is at-most-once) and the range must be read from the stream first. An entry of another epoch
means the stream was deleted and recreated.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

__all__ = ["FeedCursor", "Verdict"]


class Verdict(StrEnum):
    NEXT = "next"  # deliver it
    SEEN = "seen"  # at or below the position: already delivered
    GAP = "gap"  # messages were missed: read (position, entry] from the stream, then go on
    RESET = "reset"  # another epoch: the stream was recreated


class FeedCursor:
    """The shared reader's position in one session's stream."""

    __slots__ = ("epoch", "position")

    def __init__(self, epoch: bytes | None, position: StreamId) -> None:
        self.epoch = epoch
        self.position = position

    def judge(self, entry: StreamEntry, previous: StreamId) -> Verdict:
        if self.epoch is not None and entry.epoch != self.epoch:
            return Verdict.RESET
        if entry.stream_id <= self.position:
            return Verdict.SEEN
        if previous == self.position:
            return Verdict.NEXT
        return Verdict.GAP

    def advance(self, entries: Sequence[StreamEntry]) -> list[StreamEntry]:
        """Record delivery of a run read from the stream; returns the part not delivered before."""
        fresh = [entry for entry in entries if entry.stream_id > self.position]
        if fresh:
            self.position = fresh[-1].stream_id
            self.epoch = fresh[-1].epoch
        return fresh

    def reset(self, epoch: bytes) -> None:
        self.epoch = epoch
        self.position = StreamId.ZERO

    def skip_to(self, position: StreamId) -> None:
        """Entries before `position` were trimmed before they could be delivered: go on from there."""
        self.position = position
