"""From an upstream's ``chat.completion.chunk`` objects to the updates a generation is made of. Pure: no I/O.

`updates_from_chunk` maps one chunk on its own. `ChunkReader` reads the chunks of one stream in order,
and repairs what some OpenAI-compatible providers send differently from OpenAI:

* **Tool-call deltas without an ``index``.** Each call is then known by its ``id``: a new id is the next
  call, a known one its call again, and a delta with neither continues the call before it.
* **Cumulative text.** DashScope with ``incremental_output`` off (and gateways in front of it) sends, in
  each chunk, everything so far instead of what is new. Each text channel (`TextChannel`) tells the two
  apart from its first pieces and turns cumulative text back into deltas.
* **Text that is not valid Unicode.** JSON may escape a lone UTF-16 surrogate (``"\\ud800"``): valid JSON
  that decodes to a ``str`` no UTF-8 encoder accepts, so it would fail every later write of the generation.
  `well_formed` replaces each one with U+FFFD, as a UTF-8 decoder replaces an invalid byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "ChunkReader",
    "ContentPiece",
    "FinishPiece",
    "ReasoningPiece",
    "TextChannel",
    "ToolCallPiece",
    "Update",
    "UsagePiece",
    "updates_from_chunk",
    "well_formed",
]


@dataclass(frozen=True, slots=True)
class ContentPiece:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningPiece:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallPiece:
    index: int
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class FinishPiece:
    reason: str


@dataclass(frozen=True, slots=True)
class UsagePiece:
    usage: dict[str, Any]


Update = ContentPiece | ReasoningPiece | ToolCallPiece | FinishPiece | UsagePiece


def well_formed(value: Any) -> Any:
    """`value` (decoded JSON) with every lone surrogate in its strings, keys included, replaced by U+FFFD;
    a surrogate pair escaped as two halves of one string becomes its character."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, list):
        return [well_formed(item) for item in value]
    if isinstance(value, dict):
        return {well_formed(key): well_formed(item) for key, item in value.items()}
    return value


class _Mode(Enum):
    UNKNOWN = "unknown"  # too few pieces to tell
    INCREMENTAL = "incremental"  # each piece is what is new (OpenAI, and nearly everyone)
    CUMULATIVE = "cumulative"  # each piece is everything so far


class TextChannel:
    """One text channel (content or reasoning) of one stream, as deltas, whether the upstream sends deltas
    or the whole text so far.

    A piece that extends the whole text so far could be either: the second piece of an incremental stream
    that happens to start with the first ("ha", "haha"), or cumulative text. So such a second piece is held
    back until the third tells: cumulative text extends the second too, and an incremental third piece
    extending the first two is as good as never seen. The first piece that does not extend the text so far
    settles the channel as incremental, which is nearly always the second: then nothing is ever held."""

    __slots__ = ("_first", "_held", "_mode", "_seen", "incremental")

    def __init__(self) -> None:
        self.incremental = False  # settled as incremental: every piece is its own delta (the hot path)
        self._mode = _Mode.UNKNOWN
        self._first: str | None = None  # the first piece, while the mode is unknown
        self._held: str | None = None  # a second piece extending the first, until a third tells
        self._seen = ""  # in cumulative mode: the text so far

    def feed(self, piece: str, final: bool = False) -> str:
        """The delta `piece` adds ('' for none yet). `piece` is not empty; `final`: it comes with the
        finish reason, where a cumulative provider repeats the whole text (dropped, even after one piece)."""
        if self.incremental:
            return piece
        if self._mode is _Mode.CUMULATIVE:
            return self._cumulative(piece)
        if self._first is None:
            self._first = piece
            return piece
        if final and self._held is None and piece == self._first:
            return ""
        if self._held is None:
            if _extends(piece, self._first):
                self._held = piece
                return ""
            self._settle_incremental()
            return piece
        return self._tell(piece)

    def flush(self) -> str:
        """What is still held when the stream ends: two pieces, the second extending the first, are taken
        for cumulative text (the likelier reading of so little)."""
        if self._held is None or self._first is None:
            return ""
        delta, self._held = self._held[len(self._first) :], None
        return delta

    def _tell(self, piece: str) -> str:
        held, first = self._held, self._first
        assert held is not None
        assert first is not None
        if piece == held:  # a cumulative provider repeating itself: still two readings
            return ""
        self._held = None
        if _extends(piece, held):
            self._mode, self._seen = _Mode.CUMULATIVE, piece
            return piece[len(first) :]
        self._settle_incremental()
        return held + piece

    def _cumulative(self, piece: str) -> str:
        if piece.startswith(self._seen):
            delta, self._seen = piece[len(self._seen) :], piece
            return delta
        # The text so far changed under us: nothing can be taken back, so what comes is taken as new.
        self._settle_incremental()
        return piece

    def _settle_incremental(self) -> None:
        self._mode, self.incremental = _Mode.INCREMENTAL, True


def _extends(piece: str, text: str) -> bool:
    return len(piece) > len(text) and piece.startswith(text)


class _ToolCallIndexes:
    """The index of each tool-call delta, given or not (see the module's docstring)."""

    __slots__ = ("_by_id", "_last")

    def __init__(self) -> None:
        self._by_id: dict[str, int] = {}
        self._last = -1

    def index(self, given: object, call_id: str | None) -> int | None:
        """The call's index; None for an index of the wrong type (the delta is ignored, not trusted)."""
        if isinstance(given, int) and not isinstance(given, bool):
            index = given
        elif given is not None:
            return None
        elif call_id is not None and call_id in self._by_id:
            index = self._by_id[call_id]
        elif call_id is not None:
            index = max(self._by_id.values(), default=self._last) + 1
        else:
            index = max(self._last, 0)
        if call_id is not None:
            self._by_id.setdefault(call_id, index)
        self._last = index
        return index


class ChunkReader:
    """The updates of one stream's chunks, read in order (a new reader for each stream)."""

    __slots__ = ("_content", "_reasoning", "_tool_calls")

    def __init__(self) -> None:
        self._content = TextChannel()
        self._reasoning = TextChannel()
        self._tool_calls = _ToolCallIndexes()

    def updates(self, chunk: object, *, suspect: bool = False) -> list[Update]:
        """What one chunk (decoded JSON) adds. `suspect`: its JSON may escape surrogates (it holds
        ``\\ud``), so its strings are made `well_formed` first. Tolerates provider quirks: empty deltas,
        usage on every chunk, unknown members, and members of the wrong type (ignored rather than trusted).
        """
        if not isinstance(chunk, dict):
            return []
        members: dict[str, Any] = well_formed(chunk) if suspect else chunk
        updates: list[Update] = []
        choices = members.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # we always ask for n=1; anything else is noise
            finish_reason = choice.get("finish_reason")
            final = isinstance(finish_reason, str) and bool(finish_reason)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta_updates(delta, updates, final)
            if final:
                updates += self.flush()
                updates.append(FinishPiece(str(finish_reason)))
        usage = members.get("usage")
        if isinstance(usage, dict):
            updates.append(UsagePiece({key: value for key, value in usage.items() if value is not None}))
        return updates

    def content(self, chunk: object) -> str | None:
        """The text of a chunk that carries content and nothing else, once this stream's text is known to be
        incremental: nearly every chunk, read here without building updates ('' for no text). None for any
        other chunk, which `updates` reads; both give the same text for a chunk they both read."""
        if type(chunk) is not dict or type(chunk.get("usage")) is dict:
            return None
        return self.choices_content(chunk.get("choices"))

    def choices_content(self, choices: object) -> str | None:
        """`content` of a chunk whose members other than ``choices`` are known to carry nothing (no usage)."""
        if type(choices) is not list or len(choices) != 1 or not self._content.incremental:
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") or choice.get("index", 0) != 0:
            return None
        delta = choice.get("delta")
        if type(delta) is not dict:
            return None
        content = delta.get("content")
        if (content is None or len(delta) != 1) and (  # else its one member is the content
            delta.get("reasoning_content") or delta.get("reasoning") or delta.get("tool_calls") is not None
        ):
            return None
        return content if type(content) is str else ""

    def flush(self) -> list[Update]:
        """Text still held back (`TextChannel.flush`): at the finish, or at the end of the stream."""
        flushed: list[Update] = []
        if reasoning := self._reasoning.flush():
            flushed.append(ReasoningPiece(reasoning))
        if content := self._content.flush():
            flushed.append(ContentPiece(content))
        return flushed

    def _delta_updates(self, delta: dict[str, Any], updates: list[Update], final: bool) -> None:
        # DeepSeek and Qwen stream reasoning as `reasoning_content`; some gateways call it `reasoning`.
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning and (text := self._reasoning.feed(reasoning, final)):
            updates.append(ReasoningPiece(text))
        content = delta.get("content")
        if type(content) is str and content:  # nearly every chunk, whose text, once settled, is its delta
            channel = self._content
            text = content if channel.incremental else channel.feed(content, final)
            if text:
                updates.append(ContentPiece(text))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                piece = self._tool_call(call)
                if piece is not None:
                    updates.append(piece)

    def _tool_call(self, call: dict[str, Any]) -> ToolCallPiece | None:
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        name, arguments, call_id = function.get("name"), function.get("arguments"), call.get("id")
        call_id = call_id if isinstance(call_id, str) else None
        index = self._tool_calls.index(call.get("index"), call_id)
        if index is None:
            return None
        return ToolCallPiece(
            index,
            call_id,
            name if isinstance(name, str) else None,
            arguments if isinstance(arguments, str) else "",
        )


def updates_from_chunk(chunk: object) -> list[Update]:
    """What one chunk adds, read on its own (`ChunkReader` reads a whole stream)."""
    return ChunkReader().updates(chunk)
