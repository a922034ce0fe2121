"""The OpenAI-compatible routes. Each authenticates, checks the body (`bodies`), accepts the generation exactly
as the native route does (`api.http.generations`), and answers over a `Follower` (`answers`).

=====================================================  ==========================================================
route                                                  what
=====================================================  ==========================================================
``POST /v1/chat/completions``                          a generation, answered as OpenAI's chat completions
``GET /v1/chat/completions/{id}``                      its ``chat.completion``; ``?stream=true`` its chunks again,
                                                       after ``Last-Event-ID``
``POST /v1/responses``                                 a generation, answered as a Response (background mode)
``GET /v1/responses/{id}``                             the Response now; ``?stream=true&starting_after=n`` its
                                                       events after n
``POST /v1/responses/{id}/cancel``                     cancel it, answered with the Response once it has ended
=====================================================  ==========================================================

``X-Tokenfan-Session`` on a POST puts the generation in that session (a new one without it); every answer names
the session and the generation in ``X-Tokenfan-Session`` and ``X-Tokenfan-Generation``. API keys create and
cancel; a session token of the generation's session may read it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from fastapi import APIRouter, Header, Request, Response
from starlette.responses import JSONResponse

from api.http.generations import admit, cancel_record, services_of
from api.http.openai.answers import (
    Identity,
    chat_stream,
    chat_whole,
    response_stream,
    response_whole,
)
from api.http.openai.bodies import chat_call, json_object, response_call
from api.http.openai.chunks import ChatStream
from api.http.openai.follow import Fold, Follower, FollowingResponse, Serve, locate
from api.http.openai.responses_events import ResponseEvents, ResponseSse
from api.http.schemas import GenerationRequest
from api.http.security import Caller
from tokenfan.contract.errors import (
    GenerationNotFound,
    InvalidParameter,
    InvalidRequest,
    InvalidSessionId,
    OffsetGone,
    RateLimited,
    ResponseNotFound,
)
from tokenfan.contract.ids import generation_time_ms, is_generation_id, is_session_id, new_generation_id
from tokenfan.contract.offsets import StreamId, parse_offset
from tokenfan.runtime.auth import Principal
from tokenfan.store import AcceptOutcome, AcceptResult, GenerationRecord
from tokenfan.store.front_door import response_record, save_response_record

if TYPE_CHECKING:
    from api.http.app import Services

__all__ = ["router"]

log = structlog.get_logger("tokenfan.api.openai")

router = APIRouter()

SessionHeader = Annotated[str | None, Header(alias="X-Tokenfan-Session")]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]

_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: How long a cancel waits for the worker to end the response, before answering it as it is.
_CANCEL_WAIT_SECONDS = 10.0


# ------------------------------------------------------------------------------------------------ helpers


def _session(header: str | None, generation_id: str) -> str:
    """The session the caller named, or a new one, named after the generation that opens it."""
    if header is None:
        return "openai-" + generation_id.removeprefix("gen_").lower()
    if not is_session_id(header):
        raise InvalidSessionId(
            "X-Tokenfan-Session must be 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return header


def _stream_slot(services: Services, request: Request) -> str:
    """The caller's address, once it is known to hold fewer open streams than it may."""
    address = request.client.host if request.client else "unknown"
    if services.sse_streams[address] >= services.settings.sse_max_streams_per_address:
        raise RateLimited("too many open streams from your address; close one first", retry_after=5)
    return address


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidParameter(f"Invalid '{name}': expected true or false.", param=name)
    return value in ("true", "1")


def _target(session_header: str | None, idempotency_key: str | None) -> tuple[str, str]:
    """The session and the id of a new generation, once the headers that name them are checked."""
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1-128 of A-Z a-z 0-9 . _ : -")
    generation_id = new_generation_id()
    return _session(session_header, generation_id), generation_id


async def _accept(
    services: Services,
    key_name: str,
    target: tuple[str, str],
    body: GenerationRequest,
    idempotency_key: str | None,
) -> tuple[AcceptResult, str, StreamId]:
    """Accept the generation; returns it, its session, and the position to follow it from."""
    session_id, generation_id = target
    # Before accepting: every event of the new generation comes after this position.
    _, start = await services.store.tail(session_id)
    result = await admit(services, key_name, session_id, body, idempotency_key, generation_id)
    if result.outcome is AcceptOutcome.DUPLICATE:  # the first one's, which may have begun long ago
        found = await locate(services.store, result.generation_id)
        if found is None:
            raise GenerationNotFound(f"no generation {result.generation_id} (unknown or expired)")
        start = found[1]
    structlog.contextvars.bind_contextvars(session_id=session_id, generation_id=result.generation_id)
    return result, session_id, start


def _answer(
    services: Services,
    address: str,
    record: tuple[str, str, StreamId],
    fold: Fold,
    serve: Serve,
    *,
    expires_at: float | None = None,
) -> Response:
    session_id, generation_id, start = record
    settings = services.settings
    follower = Follower(
        services.bus,
        session_id,
        generation_id,
        start,
        fold,
        max_buffer_bytes=settings.relay_max_buffer_bytes,
        expires_at=expires_at,
    )
    return FollowingResponse(follower, serve, streams=services.sse_streams, address=address)


async def _readable(
    services: Services, principal: Principal, generation_id: str
) -> tuple[GenerationRecord, StreamId] | None:
    """The generation and where to follow it from, if it exists and this caller may read it."""
    found = await locate(services.store, generation_id) if is_generation_id(generation_id) else None
    if found is None or not (principal.is_service or principal.session_id == found[0].session_id):
        return None  # another session's looks the same as none: a token learns nothing about elsewhere
    structlog.contextvars.bind_contextvars(session_id=found[0].session_id, generation_id=generation_id)
    return found


# ------------------------------------------------------------------------------------------ chat completions


@router.post("/v1/chat/completions", include_in_schema=False)
async def create_chat_completion(
    request: Request,
    principal: Caller,
    session: SessionHeader = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    principal.require_service()
    call = chat_call(json_object(await request.body()))
    target = _target(session, idempotency_key)
    services = services_of(request)
    address = _stream_slot(services, request)  # refused before anything is stored
    result, session_id, start = await _accept(services, principal.name, target, call.request, idempotency_key)
    generation_id = result.generation_id
    log.info("openai_chat_accepted", stream=call.stream, outcome=result.outcome.value)
    fold = ChatStream(
        completion_id="chatcmpl-" + generation_id.removeprefix("gen_"),
        model=call.request.model,
        created=generation_time_ms(generation_id) // 1000,
        include_usage=call.include_usage,
        emit=call.stream,
    )
    identity = Identity(session_id, generation_id, replayed=result.outcome is AcceptOutcome.DUPLICATE)
    keepalive = services.settings.sse_keepalive_seconds
    serve = chat_stream(identity, fold, keepalive) if call.stream else chat_whole(identity, fold)
    return _answer(services, address, (session_id, generation_id, start), fold, serve)


@router.get("/v1/chat/completions/{completion_id}", include_in_schema=False)
async def get_chat_completion(
    completion_id: str, request: Request, principal: Caller, last_event_id: LastEventId = None
) -> Response:
    services = services_of(request)
    address = _stream_slot(services, request)
    generation_id = "gen_" + completion_id.removeprefix("chatcmpl-")
    found = await _readable(services, principal, generation_id)
    if found is None:
        raise GenerationNotFound(f"No chat completion found with id '{completion_id[:64]}'.")
    record, start = found
    stream = _flag(request, "stream")
    resume_after = await _resume_position(services, record.session_id, last_event_id) if stream else None
    fold = ChatStream(
        completion_id=completion_id,
        model=record.model or "",
        created=generation_time_ms(generation_id) // 1000,
        include_usage=_flag(request, "include_usage"),
        emit=stream,
        resume_after=resume_after,
    )
    identity = Identity(record.session_id, generation_id)
    keepalive = services.settings.sse_keepalive_seconds
    serve = chat_stream(identity, fold, keepalive) if stream else chat_whole(identity, fold)
    return _answer(
        services,
        address,
        (record.session_id, generation_id, start),
        fold,
        serve,
        expires_at=principal.expires_at,
    )


async def _resume_position(services: Services, session_id: str, last_event_id: str | None) -> StreamId | None:
    if last_event_id is None:
        return None
    offset = parse_offset(last_event_id)
    epoch, _ = await services.store.tail(session_id)
    if epoch is None or epoch.decode() != offset.epoch:
        raise OffsetGone("this Last-Event-ID belongs to an earlier incarnation of the session's stream")
    return offset.stream_id


# ------------------------------------------------------------------------------------------------ responses


def _response_id(generation_id: str) -> str:
    return "resp_" + generation_id.removeprefix("gen_")


@router.post("/v1/responses", include_in_schema=False)
async def create_response(
    request: Request,
    principal: Caller,
    session: SessionHeader = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    principal.require_service()
    call = response_call(json_object(await request.body()))
    target = _target(session, idempotency_key)
    services = services_of(request)
    address = _stream_slot(services, request)
    result, session_id, start = await _accept(services, principal.name, target, call.request, idempotency_key)
    generation_id, echo = result.generation_id, call.echo
    if result.outcome is AcceptOutcome.ACCEPTED:
        await save_response_record(services.store, session_id, generation_id, echo)
    else:
        echo = await response_record(services.store, session_id, generation_id) or echo
    log.info("openai_response_accepted", stream=call.stream, background=call.background)
    events = ResponseEvents(
        _response_id(generation_id), echo, created_at=generation_time_ms(generation_id) // 1000
    )
    replayed = result.outcome is AcceptOutcome.DUPLICATE
    identity = Identity(session_id, generation_id, replayed=replayed)
    if call.background and not call.stream and not replayed:
        return JSONResponse(events.response(), headers=_headers(identity))
    sse = ResponseSse(events, emit=call.stream)
    opening = sse.opening()
    if call.stream:
        serve = response_stream(identity, sse, opening, services.settings.sse_keepalive_seconds)
    else:  # in the background, a replayed request answers the first one's response as it is now
        serve = response_whole(identity, events, until_end=not call.background)
    return _answer(services, address, (session_id, generation_id, start), sse, serve)


def _headers(identity: Identity) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in identity.headers("application/json")[1:]}


async def _response(
    services: Services, principal: Principal, response_id: str
) -> tuple[GenerationRecord, StreamId, dict[str, Any]]:
    """The generation behind a response id, where to follow it from, and its Responses request."""
    match = re.fullmatch(r"resp_([0-9A-HJKMNP-TV-Z]{26})", response_id)
    found = await _readable(services, principal, "gen_" + match.group(1)) if match else None
    echo = (
        await response_record(services.store, found[0].session_id, found[0].generation_id) if found else None
    )
    if found is None or echo is None:
        raise ResponseNotFound(f"Response with id '{response_id[:64]}' not found.")
    return found[0], found[1], echo


def _starting_after(request: Request) -> int:
    raw = request.query_params.get("starting_after")
    if raw is None:
        return -1
    if not re.fullmatch(r"-?[0-9]{1,18}", raw):
        raise InvalidParameter("Invalid 'starting_after': expected an integer.", param="starting_after")
    if int(raw) < 0:
        raise InvalidParameter(
            f"Invalid 'starting_after': expected a sequence number of 0 or more, got {raw}.",
            param="starting_after",
        )
    return int(raw)


@router.get("/v1/responses/{response_id}", include_in_schema=False)
async def get_response(response_id: str, request: Request, principal: Caller) -> Response:
    services = services_of(request)
    address = _stream_slot(services, request)
    stream, starting_after = _flag(request, "stream"), _starting_after(request)
    record, start, echo = await _response(services, principal, response_id)
    generation_id = record.generation_id
    events = ResponseEvents(response_id, echo, created_at=generation_time_ms(generation_id) // 1000)
    sse = ResponseSse(events, starting_after=starting_after, emit=stream)
    opening = sse.opening()
    identity = Identity(record.session_id, generation_id)
    if stream:
        keepalive = services.settings.sse_keepalive_seconds
        serve = response_stream(identity, sse, opening, keepalive, resuming=starting_after >= 0)
    else:
        serve = response_whole(identity, events, until_end=False)
    return _answer(
        services,
        address,
        (record.session_id, generation_id, start),
        sse,
        serve,
        expires_at=principal.expires_at,
    )


@router.post("/v1/responses/{response_id}/cancel", include_in_schema=False)
async def cancel_response(response_id: str, request: Request, principal: Caller) -> Response:
    principal.require_service()
    services = services_of(request)
    address = _stream_slot(services, request)
    record, start, echo = await _response(services, principal, response_id)
    result = await cancel_record(services, record)
    log.info("openai_response_cancel", status=result.status)
    events = ResponseEvents(response_id, echo, created_at=generation_time_ms(record.generation_id) // 1000)
    sse = ResponseSse(events, emit=False)
    sse.opening()
    identity = Identity(record.session_id, record.generation_id)
    serve = response_whole(identity, events, until_end=True, within=_CANCEL_WAIT_SECONDS)
    return _answer(services, address, (record.session_id, record.generation_id, start), sse, serve)
