"""Assembling a session from its frames, with proof that nothing was missed or repeated. Pure: no I/O.

`Transcript.apply` folds frames in the order received into one `GenerationTranscript` per generation and
refuses (`TranscriptError`) anything a correct stream never produces: an offset that does not follow the
previous one, a seq that skips or repeats, or a completed generation that states anything other than what
was assembled: the text's length and SHA-256, the reasoning's (when the event states them), and each tool
call's index, id, name and the length and SHA-256 of its arguments. A ``snapshot`` frame replaces the
state of the generations it lists, reasoning and tool calls included, and the end is checked against what
it held plus what followed. A ``generation.restarted`` frame discards what that generation had produced so far,
custom (``x.*``) events included: the new attempt's hooks emit them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenfan.contract.events import APP_GENERATION_ID, EventType, GenerationStatus, text_sha256
from tokenfan.contract.offsets import Offset, parse_offset

__all__ = ["GenerationTranscript", "Transcript", "TranscriptError"]


class TranscriptError(ValueError):
    """The frames do not form a valid stream: a gap, a duplicate, or a failed end-of-stream check."""


@dataclass
class GenerationTranscript:
    generation_id: str
    status: GenerationStatus = GenerationStatus.QUEUED
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    attempt: int = 0
    last_seq: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    restarts: int = 0
    other_events: list[dict[str, Any]] = field(default_factory=list)  # types without meaning here (x.*)

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    def _discard_output(self) -> None:
        self.content.clear()
        self.reasoning.clear()
        self.tool_calls.clear()
        self.other_events.clear()  # the new attempt's hooks send their events again


class Transcript:
    """A session as assembled from frames. Feed it every frame, in order."""

    def __init__(self) -> None:
        self.generations: dict[str, GenerationTranscript] = {}
        self.last_offset: Offset | None = None
        self.frames = 0

    def apply(self, frame: dict[str, Any]) -> GenerationTranscript | None:
        if frame["type"] == "snapshot":
            self._apply_snapshot(frame)
            return None
        self._check_offset(frame)
        generation = self.generations.setdefault(
            frame["generation_id"], GenerationTranscript(frame["generation_id"])
        )
        self._check_seq(generation, frame)
        self.frames += 1
        try:
            kind = EventType(frame["type"])
        except ValueError:  # a type this client does not know (a hook's x.* event, a newer one): keep it
            generation.other_events.append(frame)
            return generation
        if kind is EventType.DELTA:
            self._apply_delta(generation, frame)
        elif kind is EventType.GENERATION_STARTED:
            generation.status = GenerationStatus.RUNNING
            generation.attempt = int(frame.get("attempt", 1))
        elif kind is EventType.GENERATION_RESTARTED:
            generation._discard_output()
            generation.restarts += 1
        elif kind is EventType.GENERATION_COMPLETED:
            self._complete(generation, frame)
        elif kind is EventType.GENERATION_FAILED:
            generation.status = GenerationStatus.FAILED
            generation.error = frame.get("error")
        elif kind is EventType.GENERATION_CANCELLED:
            generation.status = GenerationStatus.CANCELLED
        return generation

    def _apply_snapshot(self, frame: dict[str, Any]) -> None:
        """A snapshot replaces the state of each generation it lists, as of its offset."""
        if frame.get("offset"):
            self._check_offset(frame)
        for view in frame.get("generations", ()):
            generation = GenerationTranscript(view["generation_id"])
            generation.status = GenerationStatus(view["status"])
            generation.content = [view.get("text", "")] if view.get("text") else []
            generation.reasoning = [view.get("reasoning", "")] if view.get("reasoning") else []
            generation.tool_calls = {
                int(call["index"]): {
                    "id": call.get("id") or "",
                    "name": call.get("name") or "",
                    "arguments": call.get("arguments", ""),
                }
                for call in view.get("tool_calls", ())
            }
            generation.attempt = int(view.get("attempt", 0))
            generation.last_seq = int(view.get("seq", 0))
            generation.finish_reason = view.get("finish_reason")
            generation.usage = view.get("usage")
            generation.error = view.get("error")
            self.generations[generation.generation_id] = generation
        app = self.generations.get(APP_GENERATION_ID)
        if app is not None:  # apps' events the snapshot skipped are in no generation's state: count afresh
            app.last_seq = 0
        self.frames += 1

    def _check_offset(self, frame: dict[str, Any]) -> None:
        offset = parse_offset(frame["offset"])
        previous = self.last_offset
        if previous is not None and offset.epoch == previous.epoch and offset.stream_id <= previous.stream_id:
            raise TranscriptError(f"offset {offset} does not follow {previous}: a duplicate or reordering")
        self.last_offset = offset

    @staticmethod
    def _check_seq(generation: GenerationTranscript, frame: dict[str, Any]) -> None:
        seq = int(frame["seq"])
        first = int(frame.get("seq_start", seq))
        if generation.last_seq and first != generation.last_seq + 1:
            raise TranscriptError(
                f"{generation.generation_id}: seq {first} after {generation.last_seq}: "
                + ("a duplicate" if first <= generation.last_seq else "a gap")
            )
        generation.last_seq = seq

    @staticmethod
    def _apply_delta(generation: GenerationTranscript, frame: dict[str, Any]) -> None:
        if "content" in frame:
            generation.content.append(frame["content"])
        if "reasoning" in frame:
            generation.reasoning.append(frame["reasoning"])
        for call in frame.get("tool_calls", ()):
            entry = generation.tool_calls.setdefault(
                int(call["index"]), {"id": "", "name": "", "arguments": ""}
            )
            if call.get("id"):
                entry["id"] = call["id"]
            if call.get("name"):
                entry["name"] = call["name"]
            entry["arguments"] += call.get("arguments", "")

    @staticmethod
    def _complete(generation: GenerationTranscript, frame: dict[str, Any]) -> None:
        """Check everything ``generation.completed`` states against what was assembled, then complete."""
        name = generation.generation_id
        _check_digest(f"{name}: text", generation.text, frame.get("length"), frame.get("sha256"))
        reasoning_length, reasoning_sha256 = frame.get("reasoning_length"), frame.get("reasoning_sha256")
        _check_digest(f"{name}: reasoning", generation.reasoning_text, reasoning_length, reasoning_sha256)
        if "tool_calls" in frame or "sha256" in frame:  # a tokenfan end states its tool calls, if any
            _check_tool_calls(name, generation.tool_calls, frame.get("tool_calls") or [])
        generation.status = GenerationStatus.COMPLETED
        generation.finish_reason = frame.get("finish_reason")
        generation.usage = frame.get("usage")


def _check_digest(what: str, assembled: str, length: object, sha256: object) -> None:
    """`assembled` against the length (code points) and SHA-256 an end states (None: not stated)."""
    if length is not None and length != len(assembled):
        raise TranscriptError(f"{what}: assembled {len(assembled)} characters, stream says {length}")
    if sha256 is not None and sha256 != text_sha256(assembled):
        raise TranscriptError(f"{what}: assembled does not match the stream's SHA-256")


def _check_tool_calls(name: str, assembled: dict[int, dict[str, str]], stated: list[dict[str, Any]]) -> None:
    """The tool calls assembled against the digests ``generation.completed`` lists, one for each call."""
    indexes = sorted(int(digest["index"]) for digest in stated)
    if indexes != sorted(assembled):
        raise TranscriptError(f"{name}: tool calls {sorted(assembled)} assembled, stream says {indexes}")
    for digest in stated:
        index = int(digest["index"])
        call = assembled[index]
        if (call["id"] or None, call["name"] or None) != (digest.get("id"), digest.get("name")):
            raise TranscriptError(f"{name}: tool call {index} is not the call the stream names")
        _check_digest(
            f"{name}: tool call {index}", call["arguments"], digest.get("length"), digest.get("sha256")
        )
