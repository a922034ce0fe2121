"""The feed's catch-up history (`api.live.history`), pure: row by row, and under random interleavings of
appends, trims, reads backwards and resumers at any offset (a hypothesis state machine). Whatever happens, a
resumer it covers gets exactly the stream after its offset, in order, once; and it never grows past its
bound by more than one read. Several histories sharing one budget (a second machine) never hold more than it
together, and what they hold is always exactly what they account for."""

from __future__ import annotations

import bisect

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from api.live.history import ENTRY_OVERHEAD, History, HistoryBudget, entry_cost
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

EPOCH = b"e1"


def entry(index: int, epoch: bytes = EPOCH) -> StreamEntry:
    return StreamEntry(StreamId(1_000 + index // 2, index % 2), epoch, b'{"n":%d}' % index)


def read_before(
    stream: list[StreamEntry], trimmed: int, through: StreamId, count: int
) -> tuple[list[StreamEntry], StreamId | None]:
    """What `Store.read_before` answers for the stream whose first `trimmed` entries are gone."""
    held = [e for e in stream[trimmed:] if e.stream_id <= through][-count:]
    if not held:
        return [], None
    index = stream.index(held[0])
    return held, stream[index - 1].stream_id if index else StreamId.ZERO


def cut_at(history: History, position: StreamId) -> list[StreamEntry]:
    """`History.chunk` as its docstring states it, by a linear scan: the answers it remembers (where each
    one ended) must not change what it answers."""
    held = history.entries
    start = next((i for i, e in enumerate(held) if e.stream_id > position), len(held))
    number = history.base + start
    size = history.chunk_size if number % history.chunk_size == 0 else history.step
    return held[start : min(len(held), start + size - number % size)]


def drain(history: History, position: StreamId) -> list[StreamEntry]:
    """What a resumer at `position` reads, chunk after chunk, until it reaches the newest entry."""
    received: list[StreamEntry] = []
    while chunk := history.chunk(position):
        assert chunk == cut_at(history, position)
        assert len(chunk) <= history.chunk_size
        received += chunk
        position = chunk[-1].stream_id
    return received


def test_a_resumer_anywhere_in_it_gets_what_follows_cut_at_fixed_places() -> None:
    stream = [entry(n) for n in range(20)]
    history = History(stream[9].stream_id, EPOCH, max_entries=100, chunk_size=4, step=4)
    history.append(stream[10:20])
    history.prepend(*read_before(stream, 0, history.after, 6))
    assert history.after == stream[3].stream_id
    assert history.covers(stream[3].stream_id)
    assert not history.covers(stream[2].stream_id)
    # Cuts are counted from where the history began, so chunks after the first are shared by everyone.
    assert history.chunk(stream[5].stream_id) == stream[6:10]
    assert history.starts_step(stream[10].stream_id)
    assert not history.starts_step(stream[11].stream_id)
    assert drain(history, stream[3].stream_id) == stream[4:]
    assert history.chunk(stream[19].stream_id) == []


def test_a_resumer_inside_a_chunk_reads_its_own_entries_to_the_next_step_then_shared_steps() -> None:
    stream = [entry(n) for n in range(20)]
    history = History(StreamId.ZERO, EPOCH, max_entries=100, chunk_size=8, step=2)
    history.append(stream)
    assert history.chunk(stream[2].stream_id) == stream[3:4]  # its own: up to the next step
    assert history.chunk(stream[3].stream_id) == stream[4:6]  # a step, shared
    assert history.chunk(stream[7].stream_id) == stream[8:16]  # a whole chunk, shared
    assert history.starts_step(stream[4].stream_id)
    assert not history.starts_step(stream[3].stream_id)
    assert drain(history, stream[2].stream_id) == stream[3:]


def test_it_stops_growing_backwards_at_a_trimmed_gap_or_another_epoch() -> None:
    stream = [entry(n) for n in range(10)]
    history = History(stream[9].stream_id, EPOCH, max_entries=100)
    history.prepend(*read_before(stream, 0, history.after, 3))
    history.prepend([entry(5, b"e0"), entry(6, b"e0")], stream[4].stream_id)
    assert history.stuck
    assert history.after == stream[6].stream_id
    trimmed = History(stream[9].stream_id, EPOCH, max_entries=100)
    trimmed.prepend(stream[7:9], stream[6].stream_id)  # does not end at `after` (9): something in between
    assert trimmed.stuck
    assert not trimmed.can_grow_back_to(StreamId.ZERO)
    assert len(trimmed) == 0


def test_it_keeps_at_most_its_bound_dropping_whole_chunks() -> None:
    stream = [entry(n) for n in range(40)]
    history = History(StreamId.ZERO, EPOCH, max_entries=10, chunk_size=4, step=4)
    history.append(stream[:13])
    assert len(history) == 13  # 3 over: less than a chunk, nothing dropped yet
    history.append(stream[13:15])
    assert len(history) == 11
    assert history.after == stream[3].stream_id
    assert not history.covers(stream[2].stream_id)
    assert drain(history, stream[3].stream_id) == stream[4:15]
    assert not history.can_grow_back_to(StreamId.ZERO)  # full


def cost(entries: list[StreamEntry]) -> int:
    return sum(map(entry_cost, entries))


def test_growing_backwards_keeps_the_newest_part_of_a_read_that_fits_the_budget_then_stops() -> None:
    stream = [entry(n) for n in range(20)]
    budget = HistoryBudget(cost(stream[12:20]))  # every entry here costs the same
    history = History(stream[19].stream_id, EPOCH, max_entries=100, chunk_size=4, step=2, budget=budget)
    history.prepend(*read_before(stream, 0, history.after, 5))
    assert history.entries == stream[15:20]
    assert history.can_grow_back_to(StreamId.ZERO)
    history.prepend(*read_before(stream, 0, history.after, 5))  # room for 3 of the 5
    assert history.entries == stream[12:20]
    assert history.after == stream[11].stream_id  # the predecessor of the oldest kept: exact from there
    assert history.stuck
    assert not history.can_grow_back_to(StreamId.ZERO)
    assert drain(history, stream[11].stream_id) == stream[12:20]
    assert budget.held == history.held == cost(history.entries) == budget.limit


def test_a_read_backwards_with_no_room_left_adds_nothing() -> None:
    stream = [entry(n) for n in range(10)]
    budget = HistoryBudget(cost(stream[:1]) - 1)
    history = History(stream[9].stream_id, EPOCH, max_entries=100, budget=budget)
    assert history.can_grow_back_to(StreamId.ZERO)
    history.prepend(*read_before(stream, 0, history.after, 4))
    assert history.stuck
    assert len(history) == 0
    assert history.covers(stream[9].stream_id)
    assert budget.held == 0


def test_following_the_feed_past_the_budget_drops_its_oldest_entries_to_a_cut_even_all_of_them() -> None:
    stream = [entry(n) for n in range(40)]
    budget = HistoryBudget(cost(stream[:10]))
    neighbour = History(StreamId.ZERO, EPOCH, max_entries=100, budget=budget)
    history = History(StreamId.ZERO, EPOCH, max_entries=100, chunk_size=4, step=2, budget=budget)
    history.append(stream[:10])
    assert budget.held == budget.limit
    history.append(stream[10:11])  # one over: the two oldest go (to the next cut)
    assert history.entries == stream[2:11]
    assert history.after == stream[1].stream_id
    assert drain(history, stream[1].stream_id) == stream[2:11]
    neighbour.append([entry(100)])  # its neighbour needs room too: it drops what it has, down to nothing
    assert neighbour.entries == []
    assert neighbour.after == entry(100).stream_id  # it covers only the feed's position now
    assert budget.held == cost(stream[2:11]) <= budget.limit
    history.release()
    assert budget.held == 0
    neighbour.append([entry(101)])
    assert neighbour.entries == [entry(101)]
    history.append(stream[11:12])  # released: a late delivery takes nothing
    history.prepend(stream[10:11], stream[9].stream_id)
    assert budget.held == neighbour.held == ENTRY_OVERHEAD + len(entry(101).body)
    assert budget.peak <= budget.limit


class HistoryMachine(RuleBasedStateMachine):
    """A stream that grows and is trimmed, a feed that delivers behind it, the history built at the feed's
    position, reads backwards landing at any moment, and resumers checking what they would receive."""

    def __init__(self) -> None:
        super().__init__()
        self.stream = [entry(n) for n in range(12)]
        self.trimmed = 0  # the first `trimmed` entries of the stream are gone
        self.delivered = 8  # the feed has delivered stream[:delivered]
        self.history = History(self.stream[7].stream_id, EPOCH, max_entries=12, chunk_size=6, step=2)
        self.pending: tuple[list[StreamEntry], StreamId | None] | None = None  # read, not yet applied

    @rule(count=st.integers(min_value=1, max_value=4))
    def append(self, count: int) -> None:
        self.stream += [entry(len(self.stream) + n) for n in range(count)]

    @rule(count=st.integers(min_value=1, max_value=5))
    def feed_delivers(self, count: int) -> None:
        run = self.stream[self.delivered : self.delivered + count]
        self.delivered += len(run)
        self.history.append(run)

    @rule(count=st.integers(min_value=1, max_value=3))
    def trim(self, count: int) -> None:
        self.trimmed = min(self.delivered - 1, self.trimmed + count)

    @precondition(lambda self: self.pending is None and self.history.can_grow_back_to(StreamId.ZERO))
    @rule(count=st.integers(min_value=1, max_value=5))
    def read_backwards(self, count: int) -> None:
        """As the feed does: only while the history is under its bound."""
        self.pending = read_before(self.stream, self.trimmed, self.history.after, count)

    @precondition(lambda self: self.pending is not None)
    @rule()
    def read_lands(self) -> None:
        assert self.pending is not None
        run, predecessor = self.pending
        self.pending = None
        self.history.prepend(run, predecessor)

    @rule(data=st.data())
    def a_resumer_reads(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(min_value=0, max_value=self.delivered - 1))
        position = self.stream[index].stream_id
        if self.history.covers(position):
            assert drain(self.history, position) == self.stream[index + 1 : self.delivered]

    @invariant()
    def it_is_the_stream_after_its_start_up_to_the_feed(self) -> None:
        held = self.history.entries
        if held:
            start = self.stream.index(held[0])
            assert held == self.stream[start : self.delivered]
            assert self.history.after == (self.stream[start - 1].stream_id if start else StreamId.ZERO)
        assert len(held) <= self.history.max_entries + 5 + self.history.chunk_size


TestHistoryMachine = HistoryMachine.TestCase
TestHistoryMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


class SharedBudgetMachine(RuleBasedStateMachine):
    """Three sessions' feeds, each with a history while someone catches up, drawing on one small budget:
    deliveries, reads backwards landing late, histories dropped and started again in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = HistoryBudget(cost([entry(n) for n in range(9)]) + 50)
        self.streams = [[entry(n, epoch) for n in range(6)] for epoch in (b"e1", b"e2", b"e3")]
        self.delivered = [6, 6, 6]
        self.histories: list[History | None] = [None, None, None]
        self.dropped: list[History] = []  # a dropped history whose read backwards may still land

    def start(self, feed: int) -> History:
        at = self.streams[feed][self.delivered[feed] - 1]
        history = History(at.stream_id, at.epoch, max_entries=8, chunk_size=4, step=2, budget=self.budget)
        self.histories[feed] = history
        return history

    @rule(feed=st.integers(0, 2), count=st.integers(1, 4))
    def feed_delivers(self, feed: int, count: int) -> None:
        stream = self.streams[feed]
        stream += [entry(len(stream) + n, stream[0].epoch) for n in range(count)]
        run = stream[self.delivered[feed] :]
        self.delivered[feed] = len(stream)
        history = self.histories[feed]
        if history is not None:
            history.append(run)

    @rule(feed=st.integers(0, 2), count=st.integers(1, 5))
    def read_backwards_lands(self, feed: int, count: int) -> None:
        history = self.histories[feed] or self.start(feed)
        if history.can_grow_back_to(StreamId.ZERO):
            history.prepend(*read_before(self.streams[feed], 0, history.after, count))

    @rule(feed=st.integers(0, 2))
    def nobody_catches_up_any_more(self, feed: int) -> None:
        history = self.histories[feed]
        if history is not None:
            self.histories[feed] = None
            history.release()
            self.dropped.append(history)

    @precondition(lambda self: self.dropped)
    @rule()
    def a_late_read_lands_on_a_dropped_history(self) -> None:
        history = self.dropped.pop()
        history.prepend([entry(0)], StreamId.ZERO)
        history.append([entry(99)])

    @invariant()
    def the_budget_holds_what_the_histories_hold_never_more_than_its_limit(self) -> None:
        live = [history for history in self.histories if history is not None]
        assert all(history.held == cost(history.entries) for history in live)
        assert self.budget.held == sum(history.held for history in live)
        assert self.budget.peak <= self.budget.limit

    @invariant()
    def each_is_its_stream_after_its_start_up_to_the_feed(self) -> None:
        for feed, history in enumerate(self.histories):
            if history is None:
                continue
            stream = self.streams[feed][: self.delivered[feed]]
            start = bisect.bisect_right([e.stream_id for e in stream], history.after)
            assert history.entries == stream[start:]
            assert history.after == (stream[start - 1].stream_id if start else StreamId.ZERO)


TestSharedBudgetMachine = SharedBudgetMachine.TestCase
TestSharedBudgetMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
