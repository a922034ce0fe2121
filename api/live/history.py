"""What a feed keeps of its stream while subscribers catch up: one contiguous run ending at the feed's
position, shared by every resumer whatever its offset. Pure: no I/O.

A storm of reconnects brings resumers at many different offsets (each one's last frame). Read page by page
after each offset, the same entries would be read from Redis, parsed and merged once per resumer. The
history holds them once instead: it follows the feed's position forwards (every run the feed delivers),
grows backwards on demand (the feed reads the entries before it, `SessionFeed.read_page`), and answers a
resumer at any offset it covers from memory.

It covers the entries after `after` up to the feed's position, all of them: `after` is the predecessor of
its oldest entry (entries name their predecessors), so a resumer at `after` or at any entry it holds gets
exactly what follows, no gap, no duplicate. It never holds more than `max_entries`: the oldest go first.

Its answers are cut at fixed places (`CHUNK` entries apart, counted from where the history began, and
`STEP` apart inside a chunk for a resumer that starts in its middle), so the frames of each answer are merged
once and shared by every resumer that reads it (`SessionFeed.page_batch`); only a resumer's first answer, up
to the next cut, is its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

__all__ = ["CHUNK", "STEP", "History"]

#: Entries between two cuts: a chunk of benchmark-sized deltas (about 130 bytes each) merges into one
#: frame under `api.live.frames.MAX_MERGED_BYTES`.
CHUNK = 256
#: Finer cuts inside a chunk, for a resumer that starts in its middle: its own first answer runs only to the
#: next of these (a few entries merged for it alone), then it reads steps shared with every resumer there.
STEP = 32


def _stream_id(entry: StreamEntry) -> StreamId:
    return entry.stream_id


class History:
    """The entries after `after`, up to the feed's position, oldest first."""

    __slots__ = ("after", "base", "chunk_size", "ends", "entries", "epoch", "max_entries", "step", "stuck")

    def __init__(
        self,
        after: StreamId,
        epoch: bytes | None,
        max_entries: int,
        chunk_size: int = CHUNK,
        step: int = STEP,
    ) -> None:
        self.after = after  # the predecessor of the oldest entry held: everything after it is here
        self.epoch = epoch
        self.max_entries = max_entries
        self.chunk_size = chunk_size
        self.step = step  # divides chunk_size
        self.entries: list[StreamEntry] = []
        self.base = 0  # where the cuts are counted from: the oldest entry's number, stable as entries come
        self.stuck = False  # the entries before `after` could not be read (trimmed, or another epoch)
        #: The last entry of each answer given, and the number of the entry after it: where the resumer that
        #: took the answer asks next, found without a binary search (of dataclass comparisons, a few µs a
        #: time, thousands of times in a storm).
        self.ends: dict[StreamId, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def covers(self, position: StreamId) -> bool:
        """Whether everything after `position` up to the feed's position is here."""
        return position >= self.after

    def can_grow_back_to(self, position: StreamId) -> bool:
        """Whether reading backwards could make the history cover `position`, within its bound."""
        return not self.stuck and position < self.after and len(self.entries) < self.max_entries

    def chunk(self, position: StreamId) -> list[StreamEntry]:
        """The entries after `position` (covered) up to the next cut: a whole chunk from the start of one, a
        step from a step inside one, else up to the next step. Past the first answer, each is the same run
        for every resumer that reads it."""
        entries = self.entries
        number = self.ends.get(position)
        start = -1 if number is None else number - self.base
        if not (0 < start <= len(entries) and entries[start - 1].stream_id == position):
            start = bisect.bisect_right(entries, position, key=_stream_id)
            number = self.base + start
        assert number is not None
        size = self.chunk_size if number % self.chunk_size == 0 else self.step
        end = min(len(entries), start + size - number % size)
        if end > start:
            self.ends[entries[end - 1].stream_id] = self.base + end
        return entries[start:end]

    def starts_step(self, stream_id: StreamId) -> bool:
        """Whether the entry `stream_id` is held and a step (or a chunk) begins with it: answers that begin
        there are the same for every resumer."""
        index = bisect.bisect_left(self.entries, stream_id, key=_stream_id)
        held = index < len(self.entries) and self.entries[index].stream_id == stream_id
        return held and (self.base + index) % self.step == 0

    def append(self, run: Sequence[StreamEntry]) -> None:
        """The feed delivered `run`, which follows on from the newest entry (or from `after`)."""
        self.entries.extend(run)
        excess = len(self.entries) - self.max_entries
        if excess >= self.chunk_size:  # drop whole chunks at a time: each drop moves the whole list
            excess -= excess % self.chunk_size
            self.after = self.entries[excess - 1].stream_id
            self.base += excess
            del self.entries[:excess]
            self.ends.clear()  # bounded by what is held: those that follow are found again

    def prepend(self, run: list[StreamEntry], predecessor: StreamId | None) -> None:
        """`run` was read backwards through `after` (`Store.read_before`), oldest first, and its oldest
        entry's predecessor is `predecessor`. It extends the history only if it ends exactly at `after` and
        belongs to the same stream incarnation; otherwise the history stops growing backwards."""
        if not run or predecessor is None or run[-1].stream_id != self.after:
            self.stuck = True
            return
        if self.epoch is not None and any(entry.epoch != self.epoch for entry in run):
            self.stuck = True
            return
        self.entries[:0] = run
        self.base -= len(run)
        self.after = predecessor
