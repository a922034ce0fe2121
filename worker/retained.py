"""What a running generation keeps of every token until it ends, held where the cyclic collector does not
walk it.

A worker at 500 generations at 50 tok/s keeps hundreds of thousands of small objects per minute for as long
as their generations run: the text so far, and each written event in case a failover loses it. Held one by
one in growing lists, every full collection of Python's cyclic collector visited each of them, and a
collection paused the whole process (every generation's tokens) for up to 0.9 s (docs/BENCHMARKS.md). Here
they are sealed every `BLOCK` items: a str of joined text, or a tuple of events (plain tuples and strs),
which the collector untracks the first time it sees them, since they hold nothing but strings and ints.
Items are kept in order; only the open block is a list the collector walks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

__all__ = ["BLOCK", "SentEvent", "SentEvents", "TextParts"]

#: Items per sealed block: small enough that the open list stays short, large enough that the list of
#: blocks stays short too (a 10,000-token generation keeps 40 blocks).
BLOCK = 256

#: An event as written (`tokenfan.store.EventWrite`'s fields, in order). A plain tuple, because the
#: collector untracks a plain tuple of strings and ints, but never a NamedTuple.
SentEvent = tuple[int, str, str, str, int]


class TextParts:
    """A generation's text, appended a piece at a time and joined once at the end."""

    __slots__ = ("_blocks", "_open")

    def __init__(self) -> None:
        self._blocks: list[str] = []
        self._open: list[str] = []

    def append(self, piece: str) -> None:
        parts = self._open
        parts.append(piece)
        if len(parts) >= BLOCK:
            # One str instead of BLOCK of them: a piece of a few characters costs ~50 bytes as its own str.
            self._blocks.append("".join(parts))
            parts.clear()

    def text(self) -> str:
        return "".join(self._blocks) + "".join(self._open)


class SentEvents:
    """An attempt's events as written, oldest first: resent if a failover lost them.

    Their seqs follow one another from ``first_seq``. A plain delta (content only, whose text is that
    content) is kept as its text alone and its body rebuilt by ``plain_delta`` if it must be resent: at a
    model's pace nearly every event is one, and the body (the session and generation ids, the seq, the
    escaped content) is most of what an event would otherwise keep.
    """

    __slots__ = ("_blocks", "_open", "first_seq", "plain_delta")

    def __init__(self, first_seq: int, plain_delta: Callable[[int, str], str]) -> None:
        self.first_seq = first_seq
        self.plain_delta = plain_delta  # (seq, content) -> the event's body, as it was written
        self._blocks: list[tuple[SentEvent | str, ...]] = []
        self._open: list[SentEvent | str] = []

    def extend(self, events: Iterable[SentEvent | str]) -> None:
        """The next events, in seq order: each a plain delta's text, or its fields (`EventWrite`'s)."""
        sent = self._open
        sent += events
        if len(sent) >= BLOCK:
            self._blocks.append(tuple(sent))
            sent.clear()

    def __iter__(self) -> Iterator[SentEvent]:
        return self._from(self.first_seq)

    def after(self, seq: int) -> list[SentEvent]:
        """The events with a seq above ``seq``, oldest first."""
        return list(self._from(seq + 1))

    def _from(self, start: int) -> Iterator[SentEvent]:
        seq = self.first_seq
        for block in (*self._blocks, self._open):
            if seq + len(block) <= start:  # the whole block is older
                seq += len(block)
                continue
            for event in block:
                if seq < start:
                    pass
                elif isinstance(event, str):
                    yield (seq, self.plain_delta(seq, event), event, "", 0)
                else:
                    yield event
                seq += 1
