"""What the store answers: the records and results it returns, and the reply codes of its scripts.

Each script that answers with a code has a `StrEnum` of its codes here; the store maps every reply
through it, so a code the Python side does not know fails loudly instead of being taken for another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.keys import GenerationField
from tokenfan.contract.offsets import Offset, StreamId

__all__ = [
    "AcceptOutcome",
    "AcceptReply",
    "AcceptResult",
    "GenerationRecord",
    "LeaseReply",
    "PositionReply",
    "ReadReply",
    "ReplayReply",
    "SessionSnapshot",
    "SnapshotReply",
    "StartOutcome",
    "StartResult",
    "WriteOutcome",
    "WriteResult",
]


class AcceptOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # an Idempotency-Key seen before: the earlier generation is returned
    REUSED = "reused"  # an Idempotency-Key seen before with another request: nothing was written
    CONFLICT = "conflict"  # policy=reject and the session is busy


class AcceptReply(StrEnum):
    """accept.lua's codes: the outcomes, and one the store handles itself."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REUSED = "reused"
    CONFLICT = "conflict"
    STALE = "stale"  # policy=interrupt: the queue's head changed since the store read it; nothing written


class ReplayReply(StrEnum):
    """replay.lua's codes: what an Idempotency-Key already stands for."""

    NEW = "new"  # an unknown key
    DUPLICATE = "duplicate"  # the same request: its generation
    REUSED = "reused"  # another request


@dataclass(frozen=True, slots=True)
class AcceptResult:
    outcome: AcceptOutcome
    generation_id: str  # the new one, the earlier duplicate, or the one the session is busy with
    # 1 = at the head: the caller enqueues its job (again, for a duplicate); 0 = not queued
    queue_position: int
    epoch: str


class StartOutcome(StrEnum):
    """start.lua's codes, and what `Store.start` answers."""

    STARTED = "started"
    RESTARTED = "restarted"  # an earlier attempt's lease expired: its worker is presumed dead
    EXHAUSTED = "exhausted"  # too many attempts: the caller must fail the generation
    BUSY = "busy"  # another worker holds a live lease
    TERMINAL = "terminal"  # already finished (cancelled while queued, or a duplicate job)
    MISSING = "missing"  # expired, never existed, or not accepted yet (its job may be enqueued first)
    WAITING = "waiting"  # queued behind another generation of its session: not its turn yet


@dataclass(frozen=True, slots=True)
class StartResult:
    outcome: StartOutcome
    attempt: int
    last_seq: int
    request: dict[str, Any] | None
    busy_for_ms: int = 0
    cancel_requested: str = ""  # cancellation was asked for before this attempt started


class LeaseReply(StrEnum):
    """lease.lua's codes. `Store.renew_leases` answers ``FENCED`` itself, or the cancellation reason."""

    RENEWED = "renewed"
    FENCED = "fenced"  # the attempt lost the generation: another attempt runs it, or it ended


class WriteOutcome(StrEnum):
    """write.lua's codes, per item."""

    OK = "ok"
    FENCED = "fenced"  # not this attempt's to write any more (restarted elsewhere, or finished)
    GAP = "gap"  # a seq was skipped: a bug in the caller, never retried


@dataclass(slots=True)  # not frozen: one is built per generation per flush, and a frozen one builds slowly
class WriteResult:
    outcome: WriteOutcome
    last_seq: int
    epoch: str  # the stream's epoch, '' when it has no entry
    last_id: str  # the id of the generation's newest entry, as the script gave it ('0-0' for none)
    cancel_requested: str  # '' or why cancellation was asked for
    next_generation_id: str | None  # after a finish: the session's next generation, to enqueue
    status: str

    @property
    def last_offset(self) -> Offset | None:
        """The offset of the generation's newest entry: parsed when asked for, rarely (not per flush)."""
        if not self.epoch or self.last_id == "0-0":
            return None
        return Offset(self.epoch, StreamId.parse(self.last_id))


class PositionReply(StrEnum):
    """position.lua's verdict on an offset a subscriber wants to resume after."""

    RETAINED = "retained"  # resume after it: everything after it is in the stream
    OTHER_EPOCH = "other_epoch"  # an earlier incarnation of the stream (or the session is gone)
    TRIMMED = "trimmed"  # entries after it were trimmed
    UNKNOWN = "unknown"  # the stream never had such an entry


class ReadReply(StrEnum):
    OK = "ok"
    GONE = "gone"  # entries after the start id were trimmed: the page would not follow on


class SnapshotReply(StrEnum):
    OK = "ok"
    STALE = "stale"  # the generations changed since the store read their ids, in a way that matters
    MORE = "more"  # older generations than those given may have events after `since`: give more


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    """The non-incremental view of one generation: everything known about it right now."""

    generation_id: str
    session_id: str
    status: GenerationStatus
    text: str
    reasoning: str
    tool_calls: list[dict[str, Any]]
    attempt: int
    seq: int
    model: str | None
    finish_reason: str | None
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    created_ms: int | None
    started_ms: int | None
    finished_ms: int | None
    first_offset: str | None
    last_offset: str | None
    cancel_requested: str | None

    @classmethod
    def from_fields(
        cls, session_id: str, generation_id: str, raw: dict[bytes, bytes], text: bytes, reasoning: bytes = b""
    ) -> GenerationRecord:
        """The record of a generation's hash (`raw`, as Redis returns it) and its text and reasoning."""
        fields = {k.decode(): v.decode() for k, v in raw.items()}

        def optional_int(name: str) -> int | None:
            value = fields.get(name)
            return int(value) if value else None

        def optional_json(name: str) -> dict[str, Any] | None:
            value = fields.get(name)
            return json.loads(value) if value else None

        return cls(
            generation_id=generation_id,
            session_id=session_id,
            status=GenerationStatus(fields[GenerationField.STATUS]),
            text=text.decode(),
            reasoning=reasoning.decode(),
            tool_calls=json.loads(fields.get(GenerationField.TOOL_CALLS, "[]")),
            attempt=int(fields.get(GenerationField.ATTEMPT, "0")),
            seq=int(fields.get(GenerationField.SEQ, "0")),
            model=fields.get(GenerationField.MODEL),
            finish_reason=fields.get(GenerationField.FINISH_REASON) or None,
            usage=optional_json(GenerationField.USAGE),
            error=optional_json(GenerationField.ERROR),
            created_ms=optional_int(GenerationField.CREATED_MS),
            started_ms=optional_int(GenerationField.STARTED_MS),
            finished_ms=optional_int(GenerationField.FINISHED_MS),
            first_offset=fields.get(GenerationField.FIRST_OFFSET),
            last_offset=fields.get(GenerationField.LAST_OFFSET),
            cancel_requested=fields.get(GenerationField.CANCEL_REQUESTED) or None,
        )

    def as_json(self) -> dict[str, Any]:
        """The documented JSON view (``GET /v1/generations/{id}``, and inside ``snapshot`` frames)."""
        return {
            "generation_id": self.generation_id,
            "session_id": self.session_id,
            "status": self.status.value,
            "text": self.text,
            "reasoning": self.reasoning,
            "tool_calls": self.tool_calls,
            "model": self.model,
            "attempt": self.attempt,
            "seq": self.seq,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "error": self.error,
            "created_at_ms": self.created_ms,
            "started_at_ms": self.started_ms,
            "finished_at_ms": self.finished_ms,
            "first_offset": self.first_offset,
            "last_offset": self.last_offset,
        }


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """A session's retained generations, consistent with `offset`: resume after it to continue live."""

    session_id: str
    offset: Offset | None
    generations: list[GenerationRecord]
