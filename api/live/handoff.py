"""The I/O-free core of the relay: a subscriber's way from its resume point to the shared live tail, and the
shared reader's own position in the stream. Pure: no I/O, no clock; driven by `api.live.feed`.

Subscriber (`Handoff`), transitions::

    state         input                            next          output
    ------------  -------------------------------  ------------  -------------------------------------
    CATCHING_UP   catch-up page (XRANGE result)    CATCHING_UP   its entries after `position`
    CATCHING_UP   go_live, position >= feed's      LIVE          (nothing: the feed sends from here on)
    CATCHING_UP   live batch                       CATCHING_UP   nothing: those entries are in Redis and
                                                                 the next page reads them
    LIVE          live batch                       LIVE          its entries after `position`
    any           close                            CLOSED        nothing, ever again

Why this is gap-free and duplicate-free: the feed delivers a contiguous run of the stream, and a subscriber
moves to LIVE only at an instant (no await in between) when it has sent everything up to the feed's position
or beyond; from then on every entry the feed delivers is either at or below `position` (dropped) or above it
(sent). Live entries are never buffered during catch-up, so a subscriber's memory does not depend on how far
behind it started.

Shared reader (`FeedCursor`): each entry published by a writer names its predecessor. An entry whose
predecessor is the cursor's position is next in line; one at or below the position was already delivered; any
other one means messages were missed (pub/sub is at-most-once) and the range must be read from the stream
first. An entry of another epoch means the stream was deleted and recreated.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

__all__ = ["FeedCursor", "Handoff", "Phase", "Verdict"]


class Phase(StrEnum):
    CATCHING_UP = "catching_up"
    LIVE = "live"
    CLOSED = "closed"


class Handoff:
    """One subscription of one session."""

    __slots__ = ("phase", "position")

    def __init__(self, position: StreamId) -> None:
        self.position = position
        self.phase = Phase.CATCHING_UP

    @property
    def is_live(self) -> bool:
        return self.phase is Phase.LIVE

    def on_page(self, entries: Sequence[StreamEntry]) -> list[StreamEntry]:
        """A catch-up page arrived; returns what to send, in order."""
        if self.phase is not Phase.CATCHING_UP:
            return []
        return self._after_position(entries)

    def can_go_live(self, feed_position: StreamId) -> bool:
        return self.phase is Phase.CATCHING_UP and self.position >= feed_position

    def go_live(self, feed_position: StreamId) -> None:
        if not self.can_go_live(feed_position):
            raise RuntimeError(f"cannot go live at {self.position} behind the feed at {feed_position}")
        self.phase = Phase.LIVE

    def on_live(self, entries: Sequence[StreamEntry]) -> list[StreamEntry]:
        """The feed delivered a contiguous batch; returns what to send, in order."""
        if self.phase is not Phase.LIVE:
            return []
        return self._after_position(entries)

    def close(self) -> None:
        self.phase = Phase.CLOSED

    def _after_position(self, entries: Sequence[StreamEntry]) -> list[StreamEntry]:
        if not entries or entries[-1].stream_id <= self.position:
            return []
        if entries[0].stream_id > self.position:
            fresh = list(entries)
        else:
            fresh = [entry for entry in entries if entry.stream_id > self.position]
        self.position = fresh[-1].stream_id
        return fresh


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
