"""What a generation keeps per token: the same text and events back, in order, and out of the collector's way."""

from __future__ import annotations

import gc

from hypothesis import given
from hypothesis import strategies as st

from worker.retained import BLOCK, SentEvent, SentEvents, TextParts

pieces = st.lists(st.text(max_size=6), max_size=3 * BLOCK + 10)


def plain_delta(seq: int, content: str) -> str:
    return f'{{"seq":{seq},"content":{content!r}}}'


@given(pieces)
def test_the_text_is_every_piece_in_order(parts: list[str]) -> None:
    text = TextParts()
    for part in parts:
        text.append(part)
    assert text.text() == "".join(parts)


@given(
    st.integers(min_value=1, max_value=50),
    st.lists(st.lists(st.booleans(), min_size=1, max_size=40), max_size=40),
    st.integers(min_value=-1, max_value=900),
)
def test_the_events_after_a_seq_are_exactly_those_written_after_it(
    first: int, flushes: list[list[bool]], stored: int
) -> None:
    """Each flush keeps a run of consecutive events, each a plain delta (its text alone) or not."""
    sent = SentEvents(first, plain_delta)
    written: list[SentEvent] = []
    seq = first
    for flush in flushes:
        kept: list[SentEvent | str] = []
        for plain in flush:
            text = f"t{seq}"
            if plain:
                kept.append(text)
                written.append((seq, plain_delta(seq, text), text, "", 0))
            else:
                event = (seq, f'{{"seq":{seq},"x":1}}', text, "r", 1)
                kept.append(event)
                written.append(event)
            seq += 1
        sent.extend(kept)
    assert list(sent) == written
    assert sent.after(stored) == [event for event in written if event[0] > stored]


def test_what_a_long_generation_keeps_is_not_walked_by_the_collector() -> None:
    text, sent = TextParts(), SentEvents(1, plain_delta)
    for seq in range(1, 10 * BLOCK + 1):
        piece = f"token {seq} "
        text.append(piece)
        sent.extend([piece if seq % 3 else (seq, f'{{"seq":{seq}}}', piece, "", 0)])
    gc.collect()  # the newest block may be seen before its events are untracked: a second pass takes it
    gc.collect()
    # The collector walks tracked objects only: here, the two holders and their lists, however long.
    assert len(_tracked_from(text, sent)) <= 6
    assert text.text() == "".join(f"token {seq} " for seq in range(1, 10 * BLOCK + 1))
    assert [event[0] for event in sent] == list(range(1, 10 * BLOCK + 1))


def _tracked_from(*roots: object) -> list[object]:
    """Every object reachable from ``roots`` that the cyclic collector tracks (functions and classes aside:
    through them, an object reaches the whole program)."""
    seen: dict[int, object] = {}
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) not in seen and not callable(obj):
            seen[id(obj)] = obj
            todo += gc.get_referents(obj)
    return [obj for obj in seen.values() if gc.is_tracked(obj)]
