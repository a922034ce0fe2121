"""The event model: what a session's stream holds and what subscribers receive.

A stored event *body* is a compact JSON object without its offset. The relay turns a body into a *frame* by
splicing the offset in front (`frame_from_body`), so each event is JSON-encoded once, by the worker, and never
re-encoded on the fan-out path. See docs/PROTOCOL.md for the fields of each type. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tokenfan.contract.offsets import Offset, StreamId

__all__ = [
    "APP_GENERATION_ID",
    "TERMINAL_EVENT_TYPES",
    "EventType",
    "FailureType",
    "GenerationStatus",
    "StreamEntry",
    "decode_frame",
    "encode_body",
    "event_body",
    "frame_from_body",
    "text_sha256",
]


#: The ``generation_id`` of apps' events appended to a session through ``/ds/sessions/{id}``: they count their
#: own ``seq`` (1, 2, 3…) as one more generation of the session, so every subscriber's checks hold.
APP_GENERATION_ID = "app"


class EventType(StrEnum):
    GENERATION_STARTED = "generation.started"
    DELTA = "delta"
    GENERATION_COMPLETED = "generation.completed"
    GENERATION_FAILED = "generation.failed"
    GENERATION_CANCELLED = "generation.cancelled"
    GENERATION_RESTARTED = "generation.restarted"  # discard this generation's output so far: it starts over

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EVENT_TYPES


TERMINAL_EVENT_TYPES = frozenset(
    {EventType.GENERATION_COMPLETED, EventType.GENERATION_FAILED, EventType.GENERATION_CANCELLED}
)


class FailureType(StrEnum):
    """Why a generation failed: the ``error.type`` of ``generation.failed``, each with a client action."""

    RATE_LIMITED = "rate_limited"  # the upstream kept answering 429 past the retry budget: retry later
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # 5xx or unreachable past the retry budget: retry later
    UPSTREAM_REJECTED = "upstream_rejected"  # 4xx: the request itself is wrong (model, auth): fix it
    UPSTREAM_TIMEOUT = "upstream_timeout"  # the stream stalled longer than the read timeout
    UPSTREAM_DISCONNECTED = "upstream_disconnected"  # the stream broke off mid-way
    UPSTREAM_ERROR = "upstream_error"  # the upstream reported an error inside the stream
    TIMEOUT = "generation_timeout"  # ran longer than the job timeout
    WORKER_LOST = "worker_lost"  # the workers running it kept dying: attempts exhausted
    INTERNAL = "internal_error"  # a bug on our side; reported, never silent


class GenerationStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (GenerationStatus.COMPLETED, GenerationStatus.FAILED, GenerationStatus.CANCELLED)


def text_sha256(text: str) -> str:
    """The digest ``generation.completed`` carries: SHA-256 of the UTF-8 text, lowercase hex."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stored event as read back from a session's stream."""

    stream_id: StreamId
    epoch: bytes
    body: bytes  # the encoded body, JSON, UTF-8

    def frame(self) -> bytes:
        """The frame for subscribers, as UTF-8 bytes (sent as a text frame without decoding)."""
        return self.frame_with_body(self.body)

    def frame_with_body(self, body: bytes) -> bytes:
        """The frame of `body` (an event body, UTF-8 JSON) at this entry's offset: a merged run of deltas
        leaves at the offset of its last."""
        return b'{"offset":"' + self.epoch + b":" + str(self.stream_id).encode() + b'",' + body[1:]

    def offset(self) -> Offset:
        return Offset(self.epoch.decode(), self.stream_id)


def encode_body(body: dict[str, Any]) -> str:
    """Encode an event body: compact, UTF-8 kept as is (CJK and emoji cost their bytes, not six per char)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def frame_from_body(offset: Offset | str, body: str) -> str:
    """The frame subscribers receive: the body with ``"offset"`` spliced in as its first member."""
    if not body.startswith("{") or len(body) < 3:
        raise ValueError("an event body is a non-empty JSON object")
    return '{"offset":"' + str(offset) + '",' + body[1:]


def decode_frame(frame: str | bytes) -> dict[str, Any]:
    """Parse a frame into a dict; raises ValueError when it is not a JSON object with offset and type."""
    value = json.loads(frame)
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError("a frame is a JSON object with a string 'type'")
    return value


def event_body(
    event_type: EventType | str, *, session_id: str, generation_id: str, seq: int, **fields: Any
) -> dict[str, Any]:
    """The body of one event, members in the documented order (``None`` stays: it is JSON ``null``)."""
    body: dict[str, Any] = {
        "type": str(event_type),  # an EventType, or a hook's own ``x.`` type
        "session_id": session_id,
        "generation_id": generation_id,
        "seq": seq,
    }
    body.update(fields)
    return body
