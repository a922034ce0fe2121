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

Every history of a process draws on one `HistoryBudget` (``TOKENFAN_CATCHUP_HISTORY_BUDGET``, approximate
bytes), so a storm of reconnects to many sessions holds at most that much, however many sessions resume at
once. A history grows backwards only into what the budget has left, and stops growing backwards (`stuck`)
once it runs out; following the feed forwards, it makes room by dropping its own oldest entries, down to
none (it then covers only the feed's position). A resumer it does not cover reads pages from Redis
(`SessionFeed.read_page`, shared among resumers at nearby offsets) until it reaches the history or the feed,
so what the budget refuses costs reads, never an entry or a resumer's progress. Dropping a history
(`release`) returns what it held.

Its answers are cut at fixed places (`CHUNK` entries apart, counted from where the history began, and
`STEP` apart inside a chunk for a resumer that starts in its middle), so the frames of each answer are merged
once and shared by every resumer that reads it (`SessionFeed.page_batch`); only a resumer's first answer, up
to the next cut, is its own.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Sequence

from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

__all__ = ["CHUNK", "ENTRY_OVERHEAD", "STEP", "History", "HistoryBudget", "entry_cost"]

#: Entries between two cuts: a chunk of benchmark-sized deltas (about 130 bytes each) merges into one
#: frame under `api.live.frames.MAX_MERGED_BYTES`.
CHUNK = 256
#: Finer cuts inside a chunk, for a resumer that starts in its middle: its own first answer runs only to the
#: next of these (a few entries merged for it alone), then it reads steps shared with every resumer there.
STEP = 32
#: What an entry held costs beside its body, measured with tracemalloc (a history of 16,384 deltas read back,
#: 123-byte bodies: 314 bytes an entry): the `StreamEntry`, its `StreamId` and their integers, the body's
#: object header, the list's slot. The epoch is one `bytes` shared by a page's or a channel's entries. The
#: frames made of a history's entries for its resumers are not counted: 6-11% more in that measurement.
ENTRY_OVERHEAD = 192


def entry_cost(entry: StreamEntry) -> int:
    """What holding `entry` costs, approximately, in bytes."""
    return ENTRY_OVERHEAD + len(entry.body)


class HistoryBudget:
    """What every catch-up history of one process may hold together, in approximate bytes (`entry_cost`).
    Histories take from it as they grow and give back as they drop entries; `held` never exceeds `limit`
    (`peak`, the most it ever held, says so)."""

    __slots__ = ("held", "limit", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0

    def left(self) -> int:
        return self.limit - self.held

    def take(self, cost: int) -> None:
        """A history holds `cost` more; it checked first that there was room (`left`)."""
        self.held += cost
        self.peak = max(self.peak, self.held)

    def give(self, cost: int) -> None:
        self.held -= cost


def _stream_id(entry: StreamEntry) -> StreamId:
    return entry.stream_id


class History:
    """The entries after `after`, up to the feed's position, oldest first."""

    __slots__ = (
        "after",
        "base",
        "budget",
        "chunk_size",
        "ends",
        "entries",
        "epoch",
        "held",
        "max_entries",
        "released",
        "step",
        "stuck",
    )

    def __init__(
        self,
        after: StreamId,
        epoch: bytes | None,
        max_entries: int,
        chunk_size: int = CHUNK,
        step: int = STEP,
        budget: HistoryBudget | None = None,
    ) -> None:
        self.after = after  # the predecessor of the oldest entry held: everything after it is here
        self.epoch = epoch
        self.max_entries = max_entries
        self.chunk_size = chunk_size
        self.step = step  # divides chunk_size
        self.entries: list[StreamEntry] = []
        self.base = 0  # where the cuts are counted from: the oldest entry's number, stable as entries come
        self.stuck = False  # it grows backwards no more: trimmed, another epoch, or the budget ran out
        self.budget = budget if budget is not None else HistoryBudget(sys.maxsize)
        self.held = 0  # what its entries cost, taken from the budget
        self.released = False  # dropped by its feed: a read landing late adds nothing
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
        return (
            not self.stuck
            and position < self.after
            and len(self.entries) < self.max_entries
            and self.budget.left() > 0
        )

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
        """The feed delivered `run`, which follows on from the newest entry (or from `after`). Over its
        bound, whole chunks of the oldest go; over what the budget allows, the oldest go until it fits, the
        run's own if need be (each drop moves the whole list, so it goes on to the next cut)."""
        if self.released:
            return
        self.entries.extend(run)
        cost = sum(map(entry_cost, run))
        excess = len(self.entries) - self.max_entries
        drop = excess - excess % self.chunk_size if excess >= self.chunk_size else 0
        over = cost - self.budget.left()
        if over > 0:
            freed, count = 0, 0
            while (freed < over or (self.base + count) % self.step) and count < len(self.entries):
                freed += entry_cost(self.entries[count])
                count += 1
            drop = max(drop, count)
        if drop:
            cost -= sum(map(entry_cost, self.entries[:drop]))  # of the run too, when it goes (never taken)
            self.after = self.entries[drop - 1].stream_id
            self.base += drop
            del self.entries[:drop]
            self.ends.clear()  # bounded by what is held: those that follow are found again
        self.held += cost
        if cost >= 0:
            self.budget.take(cost)
        else:
            self.budget.give(-cost)

    def release(self) -> None:
        """Its feed dropped it: give back everything it held, and take nothing more."""
        self.budget.give(self.held)
        self.held = 0
        self.entries = []
        self.ends.clear()
        self.released = self.stuck = True

    def prepend(self, run: list[StreamEntry], predecessor: StreamId | None) -> None:
        """`run` was read backwards through `after` (`Store.read_before`), oldest first, and its oldest
        entry's predecessor is `predecessor`. It extends the history only if it ends exactly at `after` and
        belongs to the same stream incarnation; otherwise the history stops growing backwards. Only the
        newest part of it that the budget has room for is kept: the history then grows back no further."""
        if self.released:
            return
        if not run or predecessor is None or run[-1].stream_id != self.after:
            self.stuck = True
            return
        if self.epoch is not None and any(entry.epoch != self.epoch for entry in run):
            self.stuck = True
            return
        room, cost, start = self.budget.left(), 0, len(run)
        while start and cost + entry_cost(run[start - 1]) <= room:
            start -= 1
            cost += entry_cost(run[start])
        if start:
            self.stuck = True
            if start == len(run):
                return
            predecessor = run[start - 1].stream_id  # entries name their predecessors: the run is contiguous
            run = run[start:]
        self.entries[:0] = run
        self.base -= len(run)
        self.after = predecessor
        self.held += cost
        self.budget.take(cost)
