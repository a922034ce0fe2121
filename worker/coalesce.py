"""Coalescing: many upstream pieces become few events. Pure: no I/O, no clock.

Consecutive delta pieces merge into one ``delta`` event while it stays under ``max_event_bytes``. Merging
across kinds is safe because subscribers accumulate each channel on its own (content, reasoning, and the
arguments of each tool call by index): only the order *within* a channel matters, and concatenation keeps
it. Any other event (started, custom) closes the open delta, so events never overtake one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenfan.contract.events import EventType

__all__ = ["Coalescer", "PendingEvent"]


@dataclass(slots=True)
class PendingEvent:
    """An event waiting to be written; `text` is what it adds to the generation's text snapshot."""

    type: EventType | str  # a str for custom (``x.``) events emitted by hooks
    fields: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    reasoning: str = ""  # what it adds to the generation's reasoning
    size: int = 0


class Coalescer:
    """Buffers one generation's pending events between two flushes."""

    def __init__(self, *, max_event_bytes: int = 16_384, merge: bool = True) -> None:
        self.max_event_bytes = max_event_bytes
        self.merge = merge
        self._events: list[PendingEvent] = []
        self.pending_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._events)

    def add_event(self, event_type: EventType | str, **fields: Any) -> None:
        self._events.append(PendingEvent(event_type, fields, size=64))
        self.pending_bytes += 64

    def add_content(self, text: str) -> None:
        """Once per token: `_open_delta` inlined, and a new delta built whole (at a model's pace a flush
        takes every token away, so nearly every token opens one)."""
        if not text:
            return
        # A token is nearly always ASCII, whose length is its UTF-8 size: no encoding to count it.
        size = len(text) if text.isascii() else len(text.encode())
        self.pending_bytes += size
        events = self._events
        if events and self.merge:
            last = events[-1]
            if last.type is EventType.DELTA and last.size + size <= self.max_event_bytes:
                last.size += size
                fields = last.fields
                fields["content"] = fields.get("content", "") + text
                last.text += text
                return
        events.append(PendingEvent(EventType.DELTA, {"content": text}, text, "", size))

    def add_reasoning(self, text: str) -> None:
        if text:
            delta = self._open_delta(len(text.encode()))
            delta.fields["reasoning"] = delta.fields.get("reasoning", "") + text
            delta.reasoning += text

    def add_tool_call(self, index: int, *, call_id: str | None, name: str | None, arguments: str) -> None:
        if call_id is None and name is None and not arguments:
            return
        delta = self._open_delta(len(arguments.encode()) + 32)
        calls: list[dict[str, Any]] = delta.fields.setdefault("tool_calls", [])
        last = calls[-1] if calls else None
        if last is not None and last["index"] == index and call_id is None and name is None:
            last["arguments"] = last.get("arguments", "") + arguments
            return
        call: dict[str, Any] = {"index": index}
        if call_id is not None:
            call["id"] = call_id
        if name is not None:
            call["name"] = name
        call["arguments"] = arguments
        calls.append(call)

    def drain(self) -> list[PendingEvent]:
        """Hand over everything pending, oldest first, and start empty."""
        events, self._events, self.pending_bytes = self._events, [], 0
        return events

    def pop_first(self) -> PendingEvent | None:
        """Hand over only the oldest pending event (None when there is none)."""
        if not self._events:
            return None
        event = self._events.pop(0)
        self.pending_bytes = max(0, self.pending_bytes - event.size)
        return event

    def _open_delta(self, size: int) -> PendingEvent:
        self.pending_bytes += size
        last = self._events[-1] if self._events else None
        if (
            self.merge
            and last is not None
            and last.type is EventType.DELTA
            and last.size + size <= self.max_event_bytes
        ):
            last.size += size
            return last
        delta = PendingEvent(EventType.DELTA, size=size)
        self._events.append(delta)
        return delta
