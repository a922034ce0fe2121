"""How each front-door request is answered over a `Follower`: when its status is decided, and what is sent.

* A streamed chat completion holds its status line until the generation has produced output or ended, so
  that a generation the upstream refuses before its first token (an unknown model) is answered with the
  upstream's HTTP status, as OpenAI answers it, and the SDK raises the same exception (``NotFoundError``…).
  Failures after output arrive in the stream, as OpenAI sends them.
* A streamed response (Responses API) answers 200 and ``response.created`` at once: failures are
  ``response.failed``. A resumed one first checks that ``starting_after`` names an event that exists.
* A whole answer (``stream: false``) waits for the end of the generation (or, reading a response, for
  what the stream holds now) and sends one JSON object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.types import Send

from api.http.errors import error_body
from api.http.openai.chunks import ChatStream, sse_block
from api.http.openai.follow import Follower, Serve
from api.http.openai.responses_events import ResponseEvents, ResponseSse
from tokenfan.contract.errors import InvalidParameter

__all__ = ["Identity", "chat_stream", "chat_whole", "closed_error", "response_stream", "response_whole"]

#: Why a subscription ended before the generation did (its close code), as an HTTP status and error code.
_CLOSED: dict[int, tuple[int, str]] = {
    4401: (401, "unauthorized"),
    4403: (403, "forbidden"),
    4404: (404, "unknown_offset"),
    4410: (410, "offset_gone"),
    4008: (503, "unavailable"),
    1013: (503, "unavailable"),
}


@dataclass(frozen=True, slots=True)
class Identity:
    """Which generation an answer is about: every answer names it in its headers."""

    session_id: str
    generation_id: str
    replayed: bool = False  # an Idempotency-Key seen before: this answers the first request's generation

    def headers(self, content_type: str) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", content_type.encode()),
            (b"x-tokenfan-session", self.session_id.encode()),
            (b"x-tokenfan-generation", self.generation_id.encode()),
        ]
        if self.replayed:
            headers.append((b"idempotent-replayed", b"true"))
        if content_type.startswith("text/event-stream"):
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        return headers


def closed_error(closed: tuple[int, str]) -> dict[str, Any]:
    """The ``error`` object for a subscription that ended with `closed` (close code, reason)."""
    status, code = _CLOSED.get(closed[0], (500, "internal_error"))
    return error_body(status, code, closed[1])


async def _json(send: Send, identity: Identity, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    headers = [*identity.headers("application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _stream(
    send: Send, identity: Identity, follower: Follower, keepalive: float, first: bytes = b""
) -> bytes:
    """Send 200 and the stream (`first`, then what the fold makes) until the generation ends; returns the
    error payload to end with when the subscription ended first (b"" when it did not)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": identity.headers("text/event-stream; charset=utf-8"),
        }
    )

    async def write(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    if first:
        await write(first)
    closed = await follower.pump(write, keepalive)
    ending = json.dumps({"error": closed_error(closed)}).encode() if closed is not None else b""
    return ending


async def _end(send: Send, last: bytes = b"") -> None:
    await send({"type": "http.response.body", "body": last, "more_body": False})


def chat_stream(identity: Identity, fold: ChatStream, keepalive: float) -> Serve:
    async def serve(follower: Follower, send: Send) -> None:
        await follower.until(lambda: fold.has_output or fold.ended)
        if not fold.has_output and fold.failure is not None:
            await _json(send, identity, fold.failure.status, {"error": fold.failure.error()})
            return
        if not fold.has_output and follower.closed is not None:
            error = closed_error(follower.closed)
            await _json(send, identity, error["status"], {"error": error})
            return
        ending = await _stream(send, identity, follower, keepalive)
        await _end(send, sse_block([ending]) if ending else b"")

    return serve


def chat_whole(identity: Identity, fold: ChatStream) -> Serve:
    async def serve(follower: Follower, send: Send) -> None:
        await follower.until(lambda: fold.ended)
        if fold.failure is not None:
            await _json(send, identity, fold.failure.status, {"error": fold.failure.error()})
        elif follower.closed is not None:
            error = closed_error(follower.closed)
            await _json(send, identity, error["status"], {"error": error})
        else:
            await _json(send, identity, 200, fold.completion())

    return serve


def response_stream(
    identity: Identity, sse: ResponseSse, opening: bytes, keepalive: float, *, resuming: bool = False
) -> Serve:
    """Stream a response's events after ``sse.starting_after``. `resuming`: first check that the client's
    ``starting_after`` is an event that exists (OpenAI-shaped 400 when it lies beyond the last one)."""

    async def serve(follower: Follower, send: Send) -> None:
        after = sse.starting_after
        if resuming:
            await follower.until(lambda: sse.last_sequence > after or sse.ended, caught_up=True)
            if sse.last_sequence < after:
                error = InvalidParameter(
                    f"Invalid 'starting_after': {after} is beyond the last event of this response so far "
                    f"({sse.last_sequence}).",
                    param="starting_after",
                )
                await _json(
                    send, identity, 400, {"error": error_body(400, error.code, error.message, error.param)}
                )
                return
        ending = await _stream(send, identity, follower, keepalive, opening)
        if ending:
            # Not one of the response's events: it carries no number, and a resume continues after the last.
            event = {"type": "error", **json.loads(ending)["error"], "sequence_number": None}
            await _end(send, b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n")
            return
        await _end(send)

    return serve


def response_whole(
    identity: Identity, events: ResponseEvents, *, until_end: bool, within: float | None = None
) -> Serve:
    """Answer the Response object: when the generation ends (`until_end`, for at most `within` seconds), or
    as of everything its stream holds now."""

    async def serve(follower: Follower, send: Send) -> None:
        await follower.until(lambda: events.ended, caught_up=not until_end, within=within)
        if follower.closed is not None:
            error = closed_error(follower.closed)
            await _json(send, identity, error["status"], {"error": error})
            return
        await _json(send, identity, 200, events.response())

    return serve
