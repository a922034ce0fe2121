"""Durable Streams on the wire, pure: offsets, headers, JSON mode, ETags, cursors and SSE events. No I/O.

A stream's messages are entries of a Redis stream, so a Durable Streams offset is an entry id written so that
offsets sort as strings: ``<ms>_<seq>``, each 16 digits (``0000000000000000_0000000000000000`` is before
every message). A session's offsets add its epoch, ``<ms>_<seq>_<epoch>``: the same position as the
relay's ``<epoch>:<ms>-<seq>``, so an offset from an earlier incarnation of the session is recognised (410)
rather than resumed at a wrong place (docs/PROTOCOL.md, "Durable Streams").
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tokenfan.contract.errors import InvalidJson, InvalidOffset, InvalidRequest
from tokenfan.contract.offsets import StreamId

__all__ = [
    "CURSOR_EPOCH_MS",
    "ZERO_OFFSET",
    "Position",
    "control_event",
    "data_event",
    "encode_offset",
    "etag",
    "json_messages",
    "json_response",
    "media_type",
    "parse_expires_at",
    "parse_offset",
    "parse_ttl",
    "response_cursor",
    "same_config",
]

ZERO_OFFSET = "0000000000000000_0000000000000000"
_OFFSET = re.compile(r"^([0-9]{16,20})_([0-9]{16,20})(?:_([0-9a-z]{1,16}))?$")
_TTL = re.compile(r"^(0|[1-9][0-9]{0,11})$")
#: Stream-Cursor intervals count from this instant (the reference server's choice, so caches agree).
CURSOR_EPOCH_MS = 1_728_432_000_000
_CURSOR_INTERVAL_MS = 20_000


@dataclass(frozen=True, slots=True)
class Position:
    """Where a read starts: after `stream_id` (of the incarnation `epoch`, for a session), or at the tail."""

    stream_id: StreamId
    epoch: str | None = None
    now: bool = False


def encode_offset(stream_id: StreamId, epoch: str | bytes | None = None) -> str:
    text = f"{stream_id.ms:016d}_{stream_id.seq:016d}"
    if epoch:
        return text + "_" + (epoch.decode() if isinstance(epoch, bytes) else epoch)
    return text


def parse_offset(text: str | None) -> Position:
    """The ``offset`` query parameter: absent or ``-1`` (the start), ``now`` (the tail), or an offset we
    gave out; raises `InvalidOffset` (400) for anything else."""
    if text is None or text == "-1":
        return Position(StreamId.ZERO)
    if text == "now":
        return Position(StreamId.ZERO, now=True)
    match = _OFFSET.fullmatch(text)
    if match is None:
        raise InvalidOffset("not a Durable Streams offset of this server")
    stream_id = StreamId(int(match.group(1)), int(match.group(2)))
    if stream_id.ms >= 1 << 64 or stream_id.seq >= 1 << 64:
        raise InvalidOffset("offset out of range")
    return Position(stream_id, match.group(3))


def parse_ttl(value: str) -> int:
    if not _TTL.fullmatch(value):
        raise InvalidRequest("Stream-TTL is a whole number of seconds, without sign or leading zeros")
    return int(value)


def parse_expires_at(value: str) -> int:
    """An RFC 3339 time as unix milliseconds; raises `InvalidRequest` when it is none."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequest("Stream-Expires-At is an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise InvalidRequest("Stream-Expires-At needs a time zone (Z or an offset)")
    return int(moment.timestamp() * 1000)


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type, lowercased, without parameters ('' for none)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_messages(body: bytes, *, allow_empty: bool) -> list[str]:
    """The messages a JSON-mode body holds (one level of array flattened), each compact JSON. Raises
    `InvalidJson` (400) for a body that is not JSON, or an empty array unless `allow_empty` (a PUT)."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise InvalidJson("the body is not valid JSON") from None
    values = value if isinstance(value, list) else [value]
    if not values and not allow_empty:
        raise InvalidJson("an empty JSON array appends nothing")
    try:
        return [json.dumps(item, ensure_ascii=False, separators=(",", ":")) for item in values]
    except RecursionError:
        raise InvalidJson("the body nests too deeply") from None


def json_response(datas: list[bytes]) -> bytes:
    """A JSON-mode read's body: every stored message (each one or more comma-joined values) in one array."""
    return b"[" + b",".join(datas) + b"]"


def etag(path: str, start: str, end: str, *, closed: bool) -> str:
    """Changes when the range's end does, or when the stream closes at it (``:c``)."""
    name = base64.urlsafe_b64encode(path.encode()).decode()
    return f'"{name}:{start}:{end}{":c" if closed else ""}"'


def response_cursor(client_cursor: str | None, now_ms: int, rng: random.Random | None = None) -> str:
    """Stream-Cursor (protocol section 8.1): the current 20-second interval; a client that echoes a cursor
    at or ahead of it gets one moved on by a random jitter, so that cached long-polls cannot loop."""
    current = (now_ms - CURSOR_EPOCH_MS) // _CURSOR_INTERVAL_MS
    try:
        held = int(client_cursor) if client_cursor else None
    except ValueError:
        held = None
    if held is None or held < current:
        return str(current)
    jitter_seconds = (rng or random).randint(1, 3600)
    return str(held + max(1, -(-jitter_seconds * 1000 // _CURSOR_INTERVAL_MS)))


def data_event(payload: str) -> bytes:
    """An SSE ``data`` event; each line of the payload its own ``data:`` line (CR, LF and CRLF all end a
    line in SSE, so none of them can smuggle an event in)."""
    lines = re.split(r"\r\n|\r|\n", payload)
    return ("event: data\n" + "".join(f"data:{line}\n" for line in lines) + "\n").encode()


def control_event(members: Mapping[str, object]) -> bytes:
    return b"event: control\ndata:" + json.dumps(dict(members), separators=(",", ":")).encode() + b"\n\n"


def same_config(held: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Whether a PUT asks for the stream as it exists (idempotent create): content type, expiry, closed,
    and fork; a fork offset only when the request names one."""
    for name in ("ctn", "ttl", "expires_at", "closed", "fork_of", "fork_sub"):
        if held.get(name, "") != wanted.get(name, ""):
            return False
    offset = wanted.get("fork_offset", "")
    return not offset or held.get("fork_offset", "") == offset
