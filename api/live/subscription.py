"""The I/O-free core of one subscription: where it is in the session's stream, and its lifecycle as a table.

A subscription moves through four states, whatever its transport (a WebSocket, a multi-session WebSocket,
an SSE response). Every change of state is one row of `TRANSITIONS`, written the way h11 writes its
connection states: the input that happened, the state that follows, and the actions the driver
(`api.live.subscriber`) carries out, in order::

    state        input          next         actions                     why
    -----------  -------------  -----------  --------------------------  ---------------------------------------
    CATCHING_UP  PAGE           CATCHING_UP  SEND, READ_PAGE             a page of the stream was read
    CATCHING_UP  FEED_REACHED   LIVE         JOIN_FEED                   nothing is left to read: the feed sends
    CATCHING_UP  LIVE_BATCH     CATCHING_UP  -                           in Redis already: a later page reads it
    LIVE         LIVE_BATCH     LIVE         SEND                        the feed delivered a batch
    LIVE         OVER_LIMIT     (policy)     see SLOW_TRANSITIONS        the transport's buffer passed its limit
    RECOVERING   SNAPSHOT_SENT  CATCHING_UP  READ_PAGE                   the backlog was replaced by a snapshot
    RECOVERING   LIVE_BATCH     RECOVERING   -                           the snapshot and catch-up cover it
    any open     RESET          CLOSED       LEAVE_FEED, CLOSE           offsets no longer mean anything (4410)
    any open     TOKEN_EXPIRED  CLOSED       LEAVE_FEED, CLOSE           the credential ran out (4401)
    any open     FAILED         CLOSED       LEAVE_FEED, CLOSE           storage away (1013), a bad offset...
    any open     LEFT           CLOSED       LEAVE_FEED                  the client went away or unsubscribed
    CLOSED       anything       CLOSED       -                           nothing, ever again

The slow-subscriber policy (``TOKENFAN_RELAY_SLOW_POLICY``) chooses the row for ``LIVE`` + ``OVER_LIMIT``:
``snapshot`` leaves the feed and sends one snapshot frame of what changed (then catches up from its offset),
``close`` ends the subscription with 4008 so that the client resumes from its last offset.

Why delivery is gap-free and duplicate-free: the feed delivers a contiguous run of the stream, and a
subscription becomes LIVE only at an instant (no await in between) when it has sent everything up to the
feed's position or beyond; from then on every entry the feed delivers is either at or below `position`
(dropped) or above it (sent). Live entries are never buffered while catching up, so a subscription's
memory does not depend on how far behind it started. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId

__all__ = [
    "SLOW_TRANSITIONS",
    "TRANSITIONS",
    "Action",
    "Input",
    "SlowPolicy",
    "State",
    "Subscription",
    "Transition",
]


class State(StrEnum):
    CATCHING_UP = "catching_up"  # reading the stream page by page from its position
    LIVE = "live"  # in the feed: every batch the feed delivers reaches it
    RECOVERING = "recovering"  # was slow: its backlog is being replaced by a snapshot
    CLOSED = "closed"

    @property
    def is_open(self) -> bool:
        return self is not State.CLOSED


class Input(StrEnum):
    PAGE = "page"
    FEED_REACHED = "feed_reached"
    LIVE_BATCH = "live_batch"
    OVER_LIMIT = "over_limit"
    SNAPSHOT_SENT = "snapshot_sent"
    RESET = "reset"
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 - an event name, not a secret
    FAILED = "failed"
    LEFT = "left"


class Action(StrEnum):
    SEND = "send"  # send the input's fresh entries as frames
    READ_PAGE = "read_page"  # read the stream after `position` (or join the feed, once there is nothing left)
    JOIN_FEED = "join_feed"  # become one of the feed's live subscribers
    LEAVE_FEED = "leave_feed"
    SEND_SNAPSHOT = "send_snapshot"  # one snapshot frame of every generation changed after `position`
    CLOSE = "close"  # end the subscription with the close code the input carries


SlowPolicy = Literal["snapshot", "close"]


@dataclass(frozen=True, slots=True)
class Transition:
    next: State
    actions: tuple[Action, ...] = ()


_ENDINGS: Final[dict[Input, Transition]] = {
    Input.RESET: Transition(State.CLOSED, (Action.LEAVE_FEED, Action.CLOSE)),
    Input.TOKEN_EXPIRED: Transition(State.CLOSED, (Action.LEAVE_FEED, Action.CLOSE)),
    Input.FAILED: Transition(State.CLOSED, (Action.LEAVE_FEED, Action.CLOSE)),
    Input.LEFT: Transition(State.CLOSED, (Action.LEAVE_FEED,)),
}

#: Every state change, by state and input. A pair that is absent changes nothing and does nothing (for
#: example a page that arrives after the subscription went live, or a second OVER_LIMIT while recovering).
TRANSITIONS: Final[dict[State, dict[Input, Transition]]] = {
    State.CATCHING_UP: {
        Input.PAGE: Transition(State.CATCHING_UP, (Action.SEND, Action.READ_PAGE)),
        Input.FEED_REACHED: Transition(State.LIVE, (Action.JOIN_FEED,)),
        Input.LIVE_BATCH: Transition(State.CATCHING_UP),
        **_ENDINGS,
    },
    State.LIVE: {
        Input.LIVE_BATCH: Transition(State.LIVE, (Action.SEND,)),
        # Input.OVER_LIMIT: see SLOW_TRANSITIONS, chosen by the policy
        **_ENDINGS,
    },
    State.RECOVERING: {
        Input.SNAPSHOT_SENT: Transition(State.CATCHING_UP, (Action.READ_PAGE,)),
        Input.LIVE_BATCH: Transition(State.RECOVERING),
        **_ENDINGS,
    },
    State.CLOSED: {},
}

#: ``LIVE`` + ``OVER_LIMIT``, by slow-subscriber policy.
SLOW_TRANSITIONS: Final[dict[SlowPolicy, Transition]] = {
    "snapshot": Transition(State.RECOVERING, (Action.LEAVE_FEED, Action.SEND_SNAPSHOT)),
    "close": Transition(State.CLOSED, (Action.LEAVE_FEED, Action.CLOSE)),
}


class Subscription:
    """One subscription of one session: its state, and its position in the session's stream."""

    __slots__ = ("position", "slow_policy", "state")

    def __init__(self, position: StreamId, slow_policy: SlowPolicy = "snapshot") -> None:
        self.position = position
        self.slow_policy = slow_policy
        self.state = State.CATCHING_UP

    @property
    def is_live(self) -> bool:
        return self.state is State.LIVE

    def transition(self, event: Input) -> Transition | None:
        """The row of the table for `event` in the current state (None: no row, nothing changes)."""
        if self.state is State.LIVE and event is Input.OVER_LIMIT:
            return SLOW_TRANSITIONS[self.slow_policy]
        return TRANSITIONS[self.state].get(event)

    def apply(self, event: Input) -> tuple[Action, ...]:
        """Take `event`: move to the state the table says, and return the actions to carry out."""
        row = self.transition(event)
        if row is None:
            return ()
        self.state = row.next
        return row.actions

    # --- the data path: which entries are fresh

    def on_page(self, entries: Sequence[StreamEntry]) -> list[StreamEntry]:
        """A catch-up page arrived (Input.PAGE); returns what to send, in order."""
        if self.state is not State.CATCHING_UP:
            return []
        return self._after_position(entries)

    def on_run(self, first: StreamId, last: StreamId) -> bool:
        """A catch-up run of entries from `first` to `last` arrived, read right after the position (the feed
        keeps runs by the position they follow): whether to send it. The position moves to `last`."""
        if self.state is not State.CATCHING_UP or not self.position < first <= last:
            return False
        self.position = last
        return True

    def can_go_live(self, feed_position: StreamId) -> bool:
        return self.state is State.CATCHING_UP and self.position >= feed_position

    def go_live(self, feed_position: StreamId) -> tuple[Action, ...]:
        """Input.FEED_REACHED. The driver checks `can_go_live` and calls this with no await in between."""
        if not self.can_go_live(feed_position):
            raise RuntimeError(f"cannot go live at {self.position} behind the feed at {feed_position}")
        return self.apply(Input.FEED_REACHED)

    def on_live(self, entries: list[StreamEntry], before: StreamId | None) -> list[StreamEntry]:
        """The feed delivered a contiguous batch (Input.LIVE_BATCH); returns what to send, in order.

        `before` is the last entry of the batch the feed delivered before this one. A subscription in step
        with the feed (its position is that very entry id object) gets `entries` itself, without comparing
        each entry: that is the fan-out's common case, thousands of times per batch."""
        if self.state is not State.LIVE:
            return []
        if self.position is before and entries:
            self.position = entries[-1].stream_id
            return entries
        return self._after_position(entries)

    def restart_at(self, position: StreamId) -> tuple[Action, ...]:
        """Input.SNAPSHOT_SENT: a snapshot as of `position` replaced the backlog; catch up from there."""
        if self.state is not State.RECOVERING:
            return ()
        self.position = position
        return self.apply(Input.SNAPSHOT_SENT)

    def close(self) -> tuple[Action, ...]:
        """Input.LEFT."""
        return self.apply(Input.LEFT)

    def _after_position(self, entries: Sequence[StreamEntry]) -> list[StreamEntry]:
        if not entries or entries[-1].stream_id <= self.position:
            return []
        if entries[0].stream_id > self.position:
            fresh = entries if isinstance(entries, list) else list(entries)
        else:
            fresh = [entry for entry in entries if entry.stream_id > self.position]
        self.position = fresh[-1].stream_id
        return fresh
