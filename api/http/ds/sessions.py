"""Sessions as Durable Streams: ``/ds/sessions/{session_id}``, a JSON stream of the session's events.

Its messages are the session's events exactly as the relay sends them (the same frames, offsets and order),
each one message; its offsets are the relay's, written ``<ms>_<seq>_<epoch>`` so that they sort as the
protocol wants (docs/PROTOCOL.md, "Durable Streams"). A session never closes, and an offset whose events were
trimmed, or that belongs to an earlier incarnation of the session, answers 410.

Apps append their own events with an API key: JSON objects whose ``type`` starts with ``x.``. Each becomes an
event of the pseudo-generation ``app`` with its own ``seq``, written by one script that moves the session's
predecessor chain exactly as a generation's write does, so it takes its place between two writes, never
inside one, and every subscriber's checks (predecessor, per-generation seq) hold across it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response

from api.http.ds.protocol import Position, encode_offset, etag, media_type, parse_offset
from api.http.ds.reading import Mode, View
from api.http.ds.streams import charge_append, read_parameters, read_response
from api.http.ds.wire import Refusal, answer, parse_producer
from tokenfan.contract.errors import (
    Conflict,
    ContentTypeMismatch,
    InvalidJson,
    InvalidOffset,
    InvalidProducer,
    InvalidRequest,
    MethodNotAllowed,
    ProducerSequenceGap,
    StaleProducerEpoch,
)
from tokenfan.contract.events import APP_GENERATION_ID, encode_body
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.runtime.auth import Principal
from tokenfan.store.streams import Producer

if TYPE_CHECKING:
    from api.http.app import Services

__all__ = [
    "app_event_bodies",
    "session_append",
    "session_create",
    "session_head",
    "session_read",
    "session_view",
]

_JSON = "application/json"
#: Members the server sets on every event: an app may not write them.
_RESERVED = ("offset", "session_id", "generation_id", "seq", "seq_start")


def session_view(session_id: str) -> View:
    return View(session_id, f"sessions/{session_id}", Mode.JSON, _JSON, session=True)


async def session_read(
    services: Services, principal: Principal, session_id: str, request: Request
) -> Response:
    principal.require_session(session_id)
    raw, live = read_parameters(request)
    position = parse_offset(raw)
    epoch, after = None, StreamId.ZERO
    if position.now:  # the tail as Redis holds it: a client reads its own appends
        epoch, after = await services.store.tail(session_id)
    elif position.stream_id != StreamId.ZERO:
        epoch, after = (
            position.epoch.encode() if position.epoch else None,
            await _resume(services, session_id, position),
        )
    return await read_response(
        services,
        principal,
        session_view(session_id),
        request,
        after=after,
        epoch=epoch,
        live=live,
        now=position.now,
        closed=False,
    )


async def _resume(services: Services, session_id: str, position: Position) -> StreamId:
    """Where a reader resumes. Its epoch is checked against what this process's feed of the session knows,
    with no Redis read per reader; only when the feed knows another epoch (or none yet) does Redis decide.
    A position whose events were trimmed answers 410 from the page read's own predecessor check."""
    if position.epoch is None:
        raise Refusal(InvalidOffset("a session's offsets carry its epoch, as given out"))
    feed = await services.bus.acquire(session_id)
    try:
        known = feed.cursor.epoch
    finally:
        services.bus.release(feed)
    if known is not None and known.decode() == position.epoch:
        return position.stream_id
    return await services.store.check_resume(session_id, Offset(position.epoch, position.stream_id))


async def session_head(services: Services, principal: Principal, session_id: str) -> Response:
    principal.require_session(session_id)
    epoch, last = await services.store.tail(session_id)
    tail = session_view(session_id).position(last, epoch)
    headers = {"Content-Type": _JSON, "Stream-Next-Offset": tail, "Cache-Control": "no-store"}
    headers["ETag"] = etag(f"sessions/{session_id}", "-1", tail, closed=False)
    return answer(200, headers)


async def session_create(
    services: Services, principal: Principal, session_id: str, request: Request
) -> Response:
    """A session exists from its first event: PUT only confirms it is a JSON stream that never closes."""
    principal.require_service()
    if media_type(request.headers.get("content-type")) not in ("", _JSON):
        raise Refusal(ContentTypeMismatch("a session is an application/json stream"))
    if request.headers.get("stream-closed", "").lower() == "true":
        raise Refusal(Conflict("a session never closes"))
    epoch, last = await services.store.tail(session_id)
    return answer(
        200, {"Content-Type": _JSON, "Stream-Next-Offset": session_view(session_id).position(last, epoch)}
    )


async def session_append(
    services: Services, principal: Principal, session_id: str, request: Request
) -> Response:
    principal.require_service()
    if request.method == "DELETE":
        raise Refusal(MethodNotAllowed("a session is deleted by expiry, not by a client"))
    if request.headers.get("stream-closed", "").lower() == "true":
        raise Refusal(Conflict("a session never closes"))
    producer = parse_producer(request)
    body = await request.body()
    if not body:
        raise Refusal(InvalidRequest("an append needs a body"))
    if media_type(request.headers.get("content-type")) != _JSON:
        raise Refusal(ContentTypeMismatch("a session is an application/json stream"))
    bodies = app_event_bodies(session_id, body)
    await charge_append(services, principal)
    reply = await services.store.append_app_events(session_id, bodies, producer)
    return _appended(reply, producer)


def app_event_bodies(session_id: str, body: bytes) -> list[tuple[str, str]]:
    """Each app event of a JSON body (an object, or an array of them) as the text before its seq and after it:
    the script numbers them. Raises `InvalidJson` / `InvalidRequest` (400) for anything else."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise Refusal(InvalidJson("the body is not valid JSON")) from None
    items: list[Any] = value if isinstance(value, list) else [value]
    if not items:
        raise Refusal(InvalidJson("an empty JSON array appends nothing"))
    bodies = []
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        if not isinstance(kind, str) or not kind.startswith("x.") or len(kind) > 128:
            raise Refusal(InvalidRequest("an app event is a JSON object whose type starts with 'x.'"))
        if any(name in item for name in _RESERVED):
            raise Refusal(InvalidRequest(f"{', '.join(_RESERVED)} are set by tokenfan, not by an app"))
        head = encode_body({"type": kind, "session_id": session_id, "generation_id": APP_GENERATION_ID})
        rest = {name: member for name, member in item.items() if name != "type"}
        bodies.append((head[:-1] + ',"seq":', ("," + encode_body(rest)[1:-1] if rest else "") + "}"))
    return bodies


def _appended(reply: list[str], producer: Producer | None) -> Response:
    code, epoch, last = reply[0], reply[1], reply[2]
    offset = encode_offset(StreamId.parse(last), epoch)
    echo = {"Producer-Epoch": str(producer.epoch), "Producer-Seq": str(producer.seq)} if producer else {}
    if code == "ok":
        return answer(200 if producer else 204, {"Stream-Next-Offset": offset, **echo})
    if code == "dup":
        return answer(204, {"Stream-Next-Offset": offset, **echo, "Producer-Seq": reply[3]})
    if code == "stale":
        raise Refusal(
            StaleProducerEpoch("a newer epoch of this producer fenced this one"), {"Producer-Epoch": reply[3]}
        )
    if code == "gap":
        gap = {"Producer-Expected-Seq": reply[3], "Producer-Received-Seq": reply[4]}
        raise Refusal(ProducerSequenceGap("a Producer-Seq was skipped"), gap)
    raise Refusal(InvalidProducer("a new producer epoch starts at Producer-Seq 0"))
