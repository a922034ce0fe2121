"""The subscription table, walked row by row: every state meets every input, under both slow policies.

The expected rows are written out here as docs/PROTOCOL.md and the module's docstring describe them, not
read from the table, so that a changed row fails a test.
"""

from __future__ import annotations

import itertools

import pytest

from api.live.subscription import Action, Input, SlowPolicy, State, Subscription
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

CLOSE = (Action.LEAVE_FEED, Action.CLOSE)
OPEN_STATES = (State.CATCHING_UP, State.LIVE, State.RECOVERING)

#: (state, input) -> (next state, actions); a pair not listed leaves the state alone and does nothing.
EXPECTED: dict[tuple[State, Input], tuple[State, tuple[Action, ...]]] = {
    (State.CATCHING_UP, Input.PAGE): (State.CATCHING_UP, (Action.SEND, Action.READ_PAGE)),
    (State.CATCHING_UP, Input.FEED_REACHED): (State.LIVE, (Action.JOIN_FEED,)),
    (State.CATCHING_UP, Input.LIVE_BATCH): (State.CATCHING_UP, ()),
    (State.LIVE, Input.LIVE_BATCH): (State.LIVE, (Action.SEND,)),
    (State.RECOVERING, Input.SNAPSHOT_SENT): (State.CATCHING_UP, (Action.READ_PAGE,)),
    (State.RECOVERING, Input.LIVE_BATCH): (State.RECOVERING, ()),
    **{(state, Input.RESET): (State.CLOSED, CLOSE) for state in OPEN_STATES},
    **{(state, Input.TOKEN_EXPIRED): (State.CLOSED, CLOSE) for state in OPEN_STATES},
    **{(state, Input.FAILED): (State.CLOSED, CLOSE) for state in OPEN_STATES},
    **{(state, Input.LEFT): (State.CLOSED, (Action.LEAVE_FEED,)) for state in OPEN_STATES},
}

SLOW: dict[SlowPolicy, tuple[State, tuple[Action, ...]]] = {
    "snapshot": (State.RECOVERING, (Action.LEAVE_FEED, Action.SEND_SNAPSHOT)),
    "close": (State.CLOSED, CLOSE),
}


def in_state(state: State, policy: SlowPolicy = "snapshot") -> Subscription:
    subscription = Subscription(StreamId(10, 0), policy)
    subscription.state = state
    return subscription


def entry(ms: int) -> StreamEntry:
    return StreamEntry(StreamId(ms, 0), b"e1", b'{"type":"delta"}')


@pytest.mark.parametrize(
    ("state", "event", "policy"),
    list(itertools.product(State, Input, ("snapshot", "close"))),
    ids=lambda value: str(value),
)
def test_every_state_meets_every_input(state: State, event: Input, policy: SlowPolicy) -> None:
    subscription = in_state(state, policy)
    if state is State.LIVE and event is Input.OVER_LIMIT:
        expected = SLOW[policy]
    else:
        expected = EXPECTED.get((state, event), (state, ()))
    actions = subscription.apply(event)
    assert (subscription.state, actions) == expected


def test_a_closed_subscription_absorbs_everything() -> None:
    subscription = in_state(State.CLOSED)
    for event in Input:
        assert subscription.apply(event) == ()
        assert subscription.state is State.CLOSED
    assert subscription.on_page([entry(11)]) == []
    assert subscription.on_live([entry(11)], None) == []
    assert subscription.restart_at(StreamId(20, 0)) == ()


@pytest.mark.parametrize("state", list(State))
def test_pages_are_sent_only_while_catching_up(state: State) -> None:
    subscription = in_state(state)
    sent = subscription.on_page([entry(9), entry(10), entry(11), entry(12)])
    if state is State.CATCHING_UP:
        assert [e.stream_id.ms for e in sent] == [11, 12]
        assert subscription.position == StreamId(12, 0)
    else:
        assert sent == []
        assert subscription.position == StreamId(10, 0)


@pytest.mark.parametrize("state", list(State))
def test_a_run_is_sent_only_while_catching_up_and_only_when_it_follows_the_position(state: State) -> None:
    subscription = in_state(state)
    assert not subscription.on_run(StreamId(9, 0), StreamId(12, 0))  # begins at or before the position
    assert not subscription.on_run(StreamId(10, 0), StreamId(12, 0))
    assert subscription.position == StreamId(10, 0)
    taken = subscription.on_run(StreamId(11, 0), StreamId(12, 0))
    assert taken is (state is State.CATCHING_UP)
    assert subscription.position == (StreamId(12, 0) if taken else StreamId(10, 0))
    assert not subscription.on_run(StreamId(11, 0), StreamId(12, 0))  # the same run again: already sent


@pytest.mark.parametrize("state", list(State))
def test_live_batches_are_sent_only_while_live(state: State) -> None:
    subscription = in_state(state)
    batch = [entry(11), entry(12)]
    sent = subscription.on_live(batch, None)
    assert sent == (batch if state is State.LIVE else [])


def test_a_subscriber_in_step_with_the_feed_gets_the_batch_itself() -> None:
    subscription = Subscription(StreamId(10, 0))
    subscription.go_live(StreamId(10, 0))
    first = [entry(11), entry(12)]
    assert subscription.on_live(first, None) == first
    second = [entry(13)]
    assert subscription.on_live(second, first[-1].stream_id) is second  # no per-entry comparison
    assert subscription.position == StreamId(13, 0)


def test_a_live_batch_it_read_ahead_of_is_sent_only_from_its_position() -> None:
    subscription = Subscription(StreamId(12, 0))
    subscription.go_live(StreamId(10, 0))  # caught up past the feed: the feed's next batch overlaps
    assert [e.stream_id.ms for e in subscription.on_live([entry(11), entry(12), entry(13)], None)] == [13]
    assert subscription.on_live([entry(12)], None) == []


def test_going_live_needs_the_feeds_position() -> None:
    subscription = Subscription(StreamId(10, 0))
    assert not subscription.can_go_live(StreamId(11, 0))
    with pytest.raises(RuntimeError):
        subscription.go_live(StreamId(11, 0))
    assert subscription.go_live(StreamId(10, 0)) == (Action.JOIN_FEED,)
    assert subscription.is_live


def test_a_snapshot_moves_a_recovering_subscription_to_its_offset() -> None:
    subscription = Subscription(StreamId(10, 0))
    subscription.go_live(StreamId(10, 0))
    assert subscription.apply(Input.OVER_LIMIT) == (Action.LEAVE_FEED, Action.SEND_SNAPSHOT)
    assert subscription.on_live([entry(11)], None) == []  # the snapshot will cover it
    assert subscription.restart_at(StreamId(30, 0)) == (Action.READ_PAGE,)
    assert subscription.state is State.CATCHING_UP
    assert subscription.position == StreamId(30, 0)
    assert subscription.restart_at(StreamId(40, 0)) == ()  # only while recovering
