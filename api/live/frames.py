"""Turning stream entries into frames, merging a backlog of deltas. Pure: no I/O.

A subscriber that is behind (catching up, or fed a batch that piled up while the relay was busy) gets
consecutive deltas of one generation as one frame: the channels concatenated, ``seq`` of the last event and
``seq_start`` of the first, the offset of the last. That is what lets one relay serve thousands of
subscribers of a fast stream: frames per second fall when the relay falls behind, instead of its lag
growing. An entry that arrives alone is sent alone and at once, so the live edge is never delayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from tokenfan.contract.events import StreamEntry, encode_body, frame_from_body

__all__ = [
    "MAX_MERGED_BYTES",
    "FrameBatch",
    "FrameEncoder",
    "close_reason",
    "control_frame",
    "frame_offset_and_type",
    "frames_for",
    "snapshot_frame",
]

#: A merged frame stops growing at about this size, so no single frame gets huge.
MAX_MERGED_BYTES = 65_536
_DELTA_PREFIX = b'{"type":"delta",'


def frames_for(entries: Sequence[StreamEntry]) -> list[bytes]:
    """The frames for a contiguous run of entries, with runs of deltas of one generation merged."""
    if len(entries) == 1:  # the live edge: nothing to merge, nothing to parse
        return [entries[0].frame()]
    frames: list[bytes] = []
    run: list[StreamEntry] = []
    bodies: list[dict[str, Any]] = []  # run's bodies, parsed once
    run_generation: object = None
    run_bytes = 0
    for entry in entries:
        if entry.body.startswith(_DELTA_PREFIX):
            body = _parse(entry.body)
            generation = body.get("generation_id")
            if run and generation == run_generation and run_bytes + len(entry.body) <= MAX_MERGED_BYTES:
                run.append(entry)
                bodies.append(body)
                run_bytes += len(entry.body)
                continue
            _flush(run, bodies, frames)
            run, bodies, run_generation, run_bytes = [entry], [body], generation, len(entry.body)
        else:
            _flush(run, bodies, frames)
            run, bodies, run_generation, run_bytes = [], [], None, 0
            frames.append(entry.frame())
    _flush(run, bodies, frames)
    return frames


#: A transport's wire encoding of a run of frames (WebSocket frames, SSE events).
FrameEncoder = Callable[[list[bytes]], bytes]


class FrameBatch:
    """A contiguous run of entries on its way to many subscribers. Its frames are made on first use, and
    each transport's wire encoding of them once, whatever the number of subscribers that receive it."""

    __slots__ = ("_encoded", "_encoder", "_frames", "entries")

    def __init__(self, entries: list[StreamEntry]) -> None:
        self.entries = entries
        self._frames: list[bytes] | None = None
        self._encoder: FrameEncoder | None = None
        self._encoded = b""

    @property
    def frames(self) -> list[bytes]:
        if self._frames is None:
            self._frames = frames_for(self.entries)
        return self._frames

    def encoded(self, encoder: FrameEncoder) -> bytes:
        """The batch's frames as `encoder` puts them on the wire, computed once per batch."""
        if self._encoder is not encoder:
            self._encoded = encoder(self.frames)
            self._encoder = encoder
        return self._encoded


_DECODER = json.JSONDecoder()


def _parse(body: bytes) -> dict[str, Any]:
    # What json.loads(body) does for a body (UTF-8, starting with '{'), minus its encoding detection.
    value: dict[str, Any] = _DECODER.decode(body.decode("utf-8", "surrogatepass"))
    return value


def _flush(run: list[StreamEntry], bodies: list[dict[str, Any]], frames: list[bytes]) -> None:
    if len(run) == 1:
        frames.append(run[0].frame())
    elif run:
        frames.append(_merge(run, bodies))


def _merge(run: list[StreamEntry], bodies: list[dict[str, Any]]) -> bytes:
    merged: dict[str, Any] = dict(bodies[-1])
    for channel in ("content", "reasoning"):
        pieces = [body[channel] for body in bodies if channel in body]
        if pieces:
            merged[channel] = "".join(pieces)
    calls = [call for body in bodies for call in body.get("tool_calls", ())]
    if calls:
        merged["tool_calls"] = calls
    merged["seq_start"] = bodies[0]["seq"]
    last = run[-1]
    return frame_from_body(last.offset(), encode_body(merged)).encode()


def frame_offset_and_type(frame: bytes) -> tuple[str, str]:
    """The offset and type of a frame (both lead it, in that order), without parsing the rest."""
    offset_end = frame.index(b'"', 11)
    type_start = offset_end + 10  # '","type":"'
    return frame[11:offset_end].decode(), frame[type_start : frame.index(b'"', type_start)].decode()


def snapshot_frame(session_id: str, offset: str, generations: list[dict[str, Any]], reason: str) -> bytes:
    """Replaces a skipped backlog: the state of every listed generation as of `offset`."""
    body = {"type": "snapshot", "session_id": session_id, "reason": reason, "generations": generations}
    return frame_from_body(offset, encode_body(body)).encode()


def control_frame(kind: str, **members: Any) -> bytes:
    """A frame about the connection rather than the stream (``subscribed``, ``error``…); it has no offset.

    Its members may echo what a client sent (a session id in an error), which may hold a lone surrogate
    (``"\\ud800"`` is valid JSON): such a character leaves as that same JSON escape, never as bytes that are
    not UTF-8, so the frame stays valid text and parses back to what the client sent."""
    return encode_body({"type": kind, **members}).encode("utf-8", "backslashreplace")


def close_reason(text: str) -> str:
    """`text` cut to fit a WebSocket close frame (123 bytes of UTF-8), never inside a character."""
    encoded = text.encode()
    if len(encoded) <= 123:
        return text
    return encoded[:123].decode(errors="ignore")
