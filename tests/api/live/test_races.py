"""The live engine's I/O-free core under random interleavings (hypothesis state machines).

The models reproduce the races of the real drivers: a catch-up page is *read* from the stream at one moment
and *processed* later, while entries keep being appended and the shared feed keeps delivering (behind the
stream); a subscriber may fall behind and be recovered with a snapshot, or be closed for it, or disconnect
at any moment and resume from the last offset it received; pub/sub may lose messages until the bus
reconnects and repairs. Whatever happens, what a subscriber received (a snapshot standing for the entries
it covers), across all its connections, is exactly the stream after its starting point, in order, once.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from api.live.cursor import FeedCursor, Verdict
from api.live.subscription import Input, SlowPolicy, State, Subscription
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

EPOCH = b"e1"


def entry(index: int) -> StreamEntry:
    return StreamEntry(StreamId(1_000 + index, index % 3), EPOCH, b'{"n":%d}' % index)


class SubscriberHandoff(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stream: list[StreamEntry] = [entry(n) for n in range(3)]
        self.feed_delivered = 0  # the feed has delivered stream[:feed_delivered] to live subscribers
        self.start = 0
        self.received: list[StreamEntry] = []
        self.policy: SlowPolicy = "snapshot"
        self.handoff = Subscription(StreamId.ZERO)
        self.page: list[StreamEntry] | None = None  # a page read from the stream, not yet processed
        self.started = False

    @property
    def feed_position(self) -> StreamId:
        return self.stream[self.feed_delivered - 1].stream_id if self.feed_delivered else StreamId.ZERO

    def _position_of(self, count: int) -> StreamId:
        return self.stream[count - 1].stream_id if count else StreamId.ZERO

    def _try_live(self) -> None:
        # The driver checks and joins with no await in between.
        if self.handoff.can_go_live(self.feed_position):
            self.handoff.go_live(self.feed_position)

    @precondition(lambda self: not self.started)
    @rule(start=st.integers(min_value=0, max_value=3), policy=st.sampled_from(["snapshot", "close"]))
    def subscribe(self, start: int, policy: SlowPolicy) -> None:
        self.started = True
        self.start = start
        self.policy = policy
        self.handoff = Subscription(self._position_of(start), policy)
        self._try_live()

    @rule(count=st.integers(min_value=1, max_value=4))
    def append(self, count: int) -> None:
        self.stream += [entry(len(self.stream) + n) for n in range(count)]

    @rule(count=st.integers(min_value=1, max_value=5))
    def feed_delivers(self, count: int) -> None:
        batch = self.stream[self.feed_delivered : self.feed_delivered + count]
        if not batch:
            return
        # The feed names the last entry of its previous batch (the very id object it delivered).
        before = self.stream[self.feed_delivered - 1].stream_id if self.feed_delivered else None
        self.feed_delivered += len(batch)
        if self.started:
            self.received += self.handoff.on_live(batch, before)

    @precondition(lambda self: self.started and self.handoff.state is State.CATCHING_UP and self.page is None)
    @rule(size=st.integers(min_value=1, max_value=4))
    def read_page(self, size: int) -> None:
        after = self.handoff.position
        self.page = [e for e in self.stream if e.stream_id > after][:size]

    @precondition(lambda self: self.page is not None)
    @rule()
    def process_page(self) -> None:
        assert self.page is not None
        self.received += self.handoff.on_page(self.page)
        self.page = None
        self._try_live()

    @precondition(lambda self: self.started)
    @rule()
    def disconnect_and_resume(self) -> None:
        self.handoff.close()
        resume_from = self.received[-1].stream_id if self.received else self._position_of(self.start)
        self.handoff = Subscription(resume_from, self.policy)
        self.page = None
        self._try_live()

    @precondition(lambda self: self.started and self.handoff.is_live)
    @rule()
    def falls_behind(self) -> None:
        # Its transport's buffer passed the limit: per policy, recover with a snapshot or close (the
        # client then resumes from its last offset: `disconnect_and_resume`).
        self.handoff.apply(Input.OVER_LIMIT)
        assert self.handoff.state is (State.RECOVERING if self.policy == "snapshot" else State.CLOSED)

    @precondition(lambda self: self.handoff.state is State.RECOVERING)
    @rule()
    def snapshot_sent(self) -> None:
        # A snapshot taken now stands for everything the stream holds; catching up goes on after it.
        self.received = self.stream[self.start :]
        self.handoff.restart_at(self._position_of(len(self.stream)))
        self.page = None
        self._try_live()

    @invariant()
    def received_is_a_gapless_prefix_of_the_stream(self) -> None:
        expected = self.stream[self.start : self.start + len(self.received)]
        assert self.received == expected

    def teardown(self) -> None:
        if not self.started:
            return
        # Drain: the feed catches up with the stream and the subscriber finishes catching up.
        if self.handoff.state is State.RECOVERING:
            self.snapshot_sent()
        if self.handoff.state is State.CLOSED:
            self.disconnect_and_resume()
        for _ in range(len(self.stream) + 2):
            if self.handoff.is_live:
                break
            self.read_page(4)
            self.process_page()
        self.feed_delivers(len(self.stream))
        assert self.handoff.is_live
        assert self.received == self.stream[self.start :]


TestSubscriberHandoff = SubscriberHandoff.TestCase
TestSubscriberHandoff.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)


class SharedFeed(RuleBasedStateMachine):
    """Pub/sub loses messages only around a disconnection; the bus then repairs every feed from the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stream: list[StreamEntry] = []
        self.published = 0  # messages for stream[:published] were sent by writers
        self.cursor = FeedCursor(EPOCH, StreamId.ZERO)
        self.delivered: list[StreamEntry] = []
        self.connected = True

    def _receive(self, index: int) -> None:
        current = self.stream[index]
        previous = self.stream[index - 1].stream_id if index else StreamId.ZERO
        verdict = self.cursor.judge(current, previous)
        if verdict is Verdict.NEXT:
            self.delivered += self.cursor.advance([current])
        elif verdict is Verdict.GAP:
            self._repair()
        else:
            assert verdict is Verdict.SEEN

    def _repair(self) -> None:
        self.delivered += self.cursor.advance([e for e in self.stream if e.stream_id > self.cursor.position])

    @rule(count=st.integers(min_value=1, max_value=3), lost=st.booleans())
    def writer_appends(self, count: int, lost: bool) -> None:
        for _ in range(count):
            self.stream.append(entry(len(self.stream)))
            index = len(self.stream) - 1
            self.published = index + 1
            if self.connected and not lost:
                self._receive(index)
            # else: lost; the next message received shows the gap (a reconnect repairs the tail)

    @rule()
    def disconnect(self) -> None:
        self.connected = False

    @rule(index=st.integers(min_value=0, max_value=60))
    def redelivered(self, index: int) -> None:
        if self.connected and index < self.published:
            self._receive(index)  # an old message seen again must change nothing

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        self.connected = True
        self._repair()  # on_subscribed after a reconnect

    @invariant()
    def delivered_is_a_gapless_prefix(self) -> None:
        assert self.delivered == self.stream[: len(self.delivered)]

    def teardown(self) -> None:
        self.connected = False
        self.reconnect()
        assert self.delivered == self.stream


TestSharedFeed = SharedFeed.TestCase
TestSharedFeed.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)


def test_going_live_behind_the_feed_is_refused() -> None:
    handoff = Subscription(StreamId(1, 0))
    with pytest.raises(RuntimeError):
        handoff.go_live(StreamId(2, 0))


def test_a_closed_subscription_receives_nothing() -> None:
    handoff = Subscription(StreamId.ZERO)
    handoff.go_live(StreamId.ZERO)
    handoff.close()
    assert handoff.on_live([entry(0)], None) == []
    assert handoff.on_page([entry(0)]) == []


def test_an_entry_of_another_epoch_is_a_reset() -> None:
    cursor = FeedCursor(EPOCH, StreamId(5, 0))
    other = StreamEntry(StreamId(6, 0), b"e2", b"{}")
    assert cursor.judge(other, StreamId.ZERO) is Verdict.RESET
    cursor.reset(b"e2")
    assert cursor.judge(other, StreamId.ZERO) is Verdict.NEXT
