"""Turning stream entries into frames, merging a backlog of deltas. Pure: no I/O.

A subscriber that is behind (catching up, or fed a batch that piled up while the relay was busy) gets
consecutive deltas of one generation as one frame: the channels concatenated, ``seq`` of the last event and
``seq_start`` of the first, the offset of the last. That is what lets one relay serve thousands of
subscribers of a fast stream: frames per second fall when the relay falls behind, instead of its lag
growing. An entry that arrives alone is sent alone and at once, so the live edge is never delayed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from tokenfan.contract.events import StreamEntry, encode_body, frame_from_body

__all__ = [
    "MAX_MERGED_BYTES",
    "FrameBatch",
    "FrameEncoder",
    "FrameRun",
    "close_reason",
    "control_frame",
    "frame_offset_and_type",
    "frames_for",
    "snapshot_frame",
]

#: A merged frame stops growing at about this size, so no single frame gets huge.
MAX_MERGED_BYTES = 65_536
_DELTA_PREFIX = b'{"type":"delta",'


def frames_for(entries: Sequence[StreamEntry], *, splice: bool = True) -> list[bytes]:
    """The frames for a contiguous run of entries, with runs of deltas of one generation merged.

    With `splice` (always, but in the test that holds the two side by side), a run of deltas written as the
    worker writes a content-only delta is merged by joining their bodies' bytes (`_splice`), else by
    parsing and re-encoding them; the two frames parse to the same value."""
    if len(entries) == 1:  # the live edge: nothing to merge, nothing to parse
        return [entries[0].frame()]
    frames: list[bytes] = []
    run: list[StreamEntry] = []
    bodies: list[_Delta] = []  # the run's bodies: matched as the common layout, or parsed, once each
    run_generation: object = None
    run_bytes = 0
    for entry in entries:
        if entry.body.startswith(_DELTA_PREFIX):
            match = _common_layout(entry.body) if splice else None
            body: _Delta
            if match is not None:
                body, generation = match, match[1]
            else:
                body = _parse(entry.body)
                generation = _generation_key(body.get("generation_id"))
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


class FrameRun:
    """Consecutive catch-up batches that leave together: what a feed's history holds right after one position,
    up to a bound (`api.live.feed.SessionFeed.held_run`), made once for every resumer at that position. `first`
    and `last` are the ids of its first and last entries; `frames` and `frame_bytes` count what one resumer is
    sent."""

    __slots__ = ("batches", "first", "frame_bytes", "frames", "last")

    def __init__(self, batches: list[FrameBatch]) -> None:
        self.batches = batches
        self.first = batches[0].entries[0].stream_id
        self.last = batches[-1].entries[-1].stream_id
        frames = [frame for batch in batches for frame in batch.frames]
        self.frames = len(frames)
        self.frame_bytes = sum(map(len, frames))


_DECODER = json.JSONDecoder()

#: A content-only delta exactly as the worker writes it (`worker.stream_writer`, `encode_body`): ids without
#: escapes or non-ASCII bytes, a seq as JSON writes an int, and content whose only escapes are the two-
#: character ones. Group 1 is the generation id, 2 the seq, 3 the content as escaped JSON text. Such
#: contents join as text: no escape spans two of them, and none can pair with another into one character
#: (a ``\u`` escape could: an escaped lone surrogate next to its other half), so the joined text decodes
#: to the contents joined, as the parsed merge makes them.
_DELTA_BODY = re.compile(
    rb'\{"type":"delta","session_id":"[^"\\\x00-\x1f\x80-\xff]*",'
    rb'"generation_id":"([^"\\\x00-\x1f\x80-\xff]*)","seq":(0|[1-9][0-9]*),'
    rb'"content":"([^"\\\x00-\x1f]*(?:\\["\\/bfnrt][^"\\\x00-\x1f]*)*)"\}'
)
#: A delta's body in a run: its match as the common layout, or parsed.
_Delta = re.Match[bytes] | dict[str, Any]


def _parse(body: bytes) -> dict[str, Any]:
    # What json.loads(body) does for a body (UTF-8, starting with '{'), minus its encoding detection.
    value: dict[str, Any] = _DECODER.decode(body.decode("utf-8", "surrogatepass"))
    return value


def _generation_key(generation: object) -> object:
    """A parsed body's generation id as a matched body's would be (its UTF-8 bytes), so that a run may mix
    the two: ids are equal exactly when their keys are."""
    return generation.encode("utf-8", "surrogatepass") if isinstance(generation, str) else generation


def _flush(run: list[StreamEntry], bodies: list[_Delta], frames: list[bytes]) -> None:
    if len(run) == 1:
        frames.append(run[0].frame())
    elif run:
        frames.append(_splice(run, bodies) or _merge(run, bodies))


def _common_layout(body: bytes) -> re.Match[bytes] | None:
    """The body matched as the common layout, if it is that and valid UTF-8 (what `_parse` refuses, or
    takes only as a lone surrogate, which no frame can carry, is left to it)."""
    match = _DELTA_BODY.fullmatch(body)
    if match is None or body.isascii():
        return match
    try:
        body.decode()
    except UnicodeDecodeError:
        return None
    return match


def _splice(run: list[StreamEntry], bodies: list[_Delta]) -> bytes | None:
    """The run's frame made from its bodies' bytes, when every body has the common layout (else None:
    `_merge` parses them).

    The merged body is the last body up to its seq, its seq, the contents joined, then ``seq_start``: the
    members `_merge` gives, in its order (the last body's, then ``seq_start``)."""
    matches = [body for body in bodies if not isinstance(body, dict)]
    if len(matches) < len(bodies):
        return None
    last, last_match = run[-1], matches[-1]
    body = b"".join(
        (
            last.body[: last_match.end(2)],
            b',"content":"',
            b"".join([match[3] for match in matches]),
            b'","seq_start":',
            matches[0][2],
            b"}",
        )
    )
    return last.frame_with_body(body)


def _merge(run: list[StreamEntry], parsed: list[_Delta]) -> bytes:
    bodies = [body if isinstance(body, dict) else _parse(body.string) for body in parsed]
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
