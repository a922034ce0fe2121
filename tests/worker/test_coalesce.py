"""Coalescing: upstream pieces become few delta events and never lose, reorder or mix up what a subscriber
assembles (content, reasoning, each tool call's arguments), whatever the merging cap and wherever flushes fall.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfan.contract.events import EventType
from worker.coalesce import Coalescer, PendingEvent


def deltas(events: list[PendingEvent]) -> list[dict[str, Any]]:
    return [event.fields for event in events if event.type is EventType.DELTA]


def test_consecutive_content_merges_into_one_delta() -> None:
    coalescer = Coalescer()
    for piece in ("Hel", "lo", ", ", "world"):
        coalescer.add_content(piece)
    events = coalescer.drain()
    assert len(events) == 1
    assert events[0].type is EventType.DELTA
    assert events[0].fields == {"content": "Hello, world"}
    assert events[0].text == "Hello, world"


def test_reasoning_and_content_share_one_delta() -> None:
    coalescer = Coalescer()
    coalescer.add_reasoning("think ")
    coalescer.add_content("An")
    coalescer.add_reasoning("more")
    coalescer.add_content("swer")
    (event,) = coalescer.drain()
    assert event.fields == {"reasoning": "think more", "content": "Answer"}
    assert event.text == "Answer"  # reasoning is not part of the generation's text
    assert event.reasoning == "think more"


def test_tool_call_pieces_append_to_the_entry_of_their_index() -> None:
    coalescer = Coalescer()
    coalescer.add_tool_call(0, call_id="call_a", name="lookup", arguments="")
    coalescer.add_tool_call(0, call_id=None, name=None, arguments='{"q":')
    coalescer.add_tool_call(0, call_id=None, name=None, arguments='"x"}')
    coalescer.add_tool_call(1, call_id="call_b", name="fetch", arguments='{"u"')
    coalescer.add_tool_call(1, call_id=None, name=None, arguments=":1}")
    (event,) = coalescer.drain()
    assert event.fields == {
        "tool_calls": [
            {"index": 0, "id": "call_a", "name": "lookup", "arguments": '{"q":"x"}'},
            {"index": 1, "id": "call_b", "name": "fetch", "arguments": '{"u":1}'},
        ]
    }
    assert event.text == ""


def test_tool_call_new_index_or_id_starts_a_new_entry() -> None:
    coalescer = Coalescer()
    coalescer.add_tool_call(0, call_id="call_a", name="f", arguments="a1")
    coalescer.add_tool_call(1, call_id=None, name=None, arguments="b1")  # a new index, even without id
    coalescer.add_tool_call(0, call_id=None, name=None, arguments="a2")  # back to 0: not the last entry
    coalescer.add_tool_call(0, call_id=None, name="g", arguments="a3")  # carries a name: a new entry
    coalescer.add_tool_call(0, call_id=None, name=None, arguments="")  # nothing at all: ignored
    (event,) = coalescer.drain()
    assert event.fields["tool_calls"] == [
        {"index": 0, "id": "call_a", "name": "f", "arguments": "a1"},
        {"index": 1, "arguments": "b1"},
        {"index": 0, "arguments": "a2"},
        {"index": 0, "name": "g", "arguments": "a3"},
    ]


def test_add_event_closes_the_open_delta() -> None:
    coalescer = Coalescer()
    coalescer.add_event(EventType.GENERATION_STARTED, attempt=1)
    coalescer.add_content("a")
    coalescer.add_content("b")
    coalescer.add_event(EventType.GENERATION_RESTARTED, attempt=2)
    coalescer.add_content("c")
    events = coalescer.drain()
    assert [event.type for event in events] == [
        EventType.GENERATION_STARTED,
        EventType.DELTA,
        EventType.GENERATION_RESTARTED,
        EventType.DELTA,
    ]
    assert events[0].fields == {"attempt": 1}
    assert events[1].fields == {"content": "ab"}
    assert events[2].fields == {"attempt": 2}
    assert events[3].fields == {"content": "c"}
    assert [event.text for event in events] == ["", "ab", "", "c"]


def test_max_event_bytes_splits_deltas() -> None:
    coalescer = Coalescer(max_event_bytes=10)
    coalescer.add_content("abcde")
    coalescer.add_content("fghij")  # exactly 10: still one event
    coalescer.add_content("k")  # 11 would exceed: a new event
    coalescer.add_content("x" * 25)  # a single piece is never cut, even when larger than the cap
    coalescer.add_content("y")
    events = coalescer.drain()
    assert [event.fields["content"] for event in events] == ["abcdefghij", "k", "x" * 25, "y"]
    assert [event.text for event in events] == ["abcdefghij", "k", "x" * 25, "y"]


def test_merge_false_gives_one_event_per_piece() -> None:
    coalescer = Coalescer(merge=False)
    coalescer.add_content("a")
    coalescer.add_content("b")
    coalescer.add_reasoning("r")
    coalescer.add_tool_call(0, call_id="c", name="f", arguments="{")
    coalescer.add_tool_call(0, call_id=None, name=None, arguments="}")
    events = coalescer.drain()
    assert [event.fields for event in events] == [
        {"content": "a"},
        {"content": "b"},
        {"reasoning": "r"},
        {"tool_calls": [{"index": 0, "id": "c", "name": "f", "arguments": "{"}]},
        {"tool_calls": [{"index": 0, "arguments": "}"}]},
    ]
    assert [event.text for event in events] == ["a", "b", "", "", ""]


def test_drain_hands_over_everything_and_empties() -> None:
    coalescer = Coalescer()
    assert not coalescer
    assert coalescer.pending_bytes == 0
    coalescer.add_content("")  # nothing to add
    coalescer.add_reasoning("")
    assert not coalescer
    coalescer.add_content("hello")
    coalescer.add_event(EventType.GENERATION_COMPLETED, finish_reason="stop")
    assert coalescer
    assert coalescer.pending_bytes > 0
    events = coalescer.drain()
    assert [event.type for event in events] == [EventType.DELTA, EventType.GENERATION_COMPLETED]
    assert not coalescer
    assert coalescer.pending_bytes == 0
    assert coalescer.drain() == []
    coalescer.add_content("again")
    assert [event.fields for event in coalescer.drain()] == [{"content": "again"}]


def test_pop_first_hands_over_only_the_oldest_event() -> None:
    coalescer = Coalescer()
    assert coalescer.pop_first() is None
    coalescer.add_event(EventType.GENERATION_STARTED, attempt=1)
    coalescer.add_content("ab")
    before = coalescer.pending_bytes
    first = coalescer.pop_first()
    assert first is not None
    assert (first.type, first.fields) == (EventType.GENERATION_STARTED, {"attempt": 1})
    assert coalescer
    assert 0 < coalescer.pending_bytes < before
    coalescer.add_content("c")  # the delta still pending keeps growing
    second = coalescer.pop_first()
    assert second is not None
    assert (second.type, second.fields, second.text) == (EventType.DELTA, {"content": "abc"}, "abc")
    assert not coalescer
    assert coalescer.pending_bytes == 0
    assert coalescer.pop_first() is None
    coalescer.add_content("d")  # a new delta: what was handed over is never written to again
    assert second.fields == {"content": "abc"}
    assert [event.fields for event in coalescer.drain()] == [{"content": "d"}]


def test_pending_bytes_grow_with_pending_text() -> None:
    coalescer = Coalescer()
    coalescer.add_content("a" * 100)
    first = coalescer.pending_bytes
    coalescer.add_content("b" * 100)
    assert coalescer.pending_bytes >= first + 100


Piece = tuple[str, int, str | None, str | None, str]

texts = st.text(max_size=8)
pieces: st.SearchStrategy[Piece] = st.one_of(
    st.builds(lambda text: ("content", 0, None, None, text), texts),
    st.builds(lambda text: ("reasoning", 0, None, None, text), texts),
    st.builds(
        lambda index, call_id, name, arguments: ("tool", index, call_id, name, arguments),
        st.integers(min_value=0, max_value=2),
        st.one_of(st.none(), st.sampled_from(["call_1", "call_2"])),
        st.one_of(st.none(), st.sampled_from(["f", "g"])),
        texts,
    ),
    st.just(("event", 0, None, None, "")),
)


def channels(events: list[PendingEvent]) -> dict[str, str]:
    """What a subscriber assembles: content, reasoning, and each tool call's arguments by index."""
    assembled: dict[str, str] = defaultdict(str)
    for event in events:
        if event.type is not EventType.DELTA:
            assembled["events"] += "|"
            continue
        assembled["content"] += event.fields.get("content", "")
        assembled["reasoning"] += event.fields.get("reasoning", "")
        for call in event.fields.get("tool_calls", ()):
            assembled[f"tool{call['index']}"] += call["arguments"]
            if "id" in call:
                assembled[f"id{call['index']}"] += call["id"] + ","
            if "name" in call:
                assembled[f"name{call['index']}"] += call["name"] + ","
    return {key: value for key, value in assembled.items() if value}


def feed(coalescer: Coalescer, piece: Piece, position: int, expected: dict[str, str]) -> None:
    """Add one piece to `coalescer` and record what it adds to each channel in `expected`."""
    kind, index, call_id, name, text = piece
    if kind == "content":
        coalescer.add_content(text)
        expected["content"] += text
    elif kind == "reasoning":
        coalescer.add_reasoning(text)
        expected["reasoning"] += text
    elif kind == "tool":
        coalescer.add_tool_call(index, call_id=call_id, name=name, arguments=text)
        expected[f"tool{index}"] += text
        if call_id is not None:
            expected[f"id{index}"] += call_id + ","
        if name is not None:
            expected[f"name{index}"] += name + ","
    else:
        coalescer.add_event(EventType.GENERATION_STARTED, attempt=position)
        expected["events"] += "|"


def adds_something(piece: Piece) -> bool:
    kind, _, call_id, name, text = piece
    if kind == "tool":
        return bool(text) or call_id is not None or name is not None
    return kind != "event" and bool(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(pieces, max_size=40),
    st.booleans(),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=40),
)
def test_coalescing_preserves_every_channel(sequence: list[Piece], merge: bool, cap: int, cut: int) -> None:
    coalescer = Coalescer(max_event_bytes=cap, merge=merge)
    expected: dict[str, str] = defaultdict(str)
    events: list[PendingEvent] = []
    for position, piece in enumerate(sequence):
        feed(coalescer, piece, position, expected)
        if position % cut == 0:
            events += coalescer.drain()  # flushes fall anywhere
            # Everything handed over so far is exactly what was added so far, channel by channel.
            assert channels(events) == {key: value for key, value in expected.items() if value}
    events += coalescer.drain()
    assert channels(events) == {key: value for key, value in expected.items() if value}
    for event in events:
        assert event.text == (event.fields.get("content", "") if event.type is EventType.DELTA else "")
        assert event.reasoning == (event.fields.get("reasoning", "") if event.type is EventType.DELTA else "")
        assert event.type is not EventType.DELTA or event.fields, "an empty delta was produced"
    started = [event.fields["attempt"] for event in events if event.type is EventType.GENERATION_STARTED]
    assert started == sorted(started)
    if not merge:
        assert len(deltas(events)) == sum(1 for piece in sequence if adds_something(piece))
