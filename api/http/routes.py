"""The request API's routes: accept generations, report their state, cancel them, mint subscriber tokens,
serve sessions as snapshots and as Server-Sent Events.

Handlers authenticate, validate, call the store, and translate outcomes into documented answers; nothing
here talks to the upstream or formats stream events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.responses import JSONResponse

from api.http.generations import admit, cancel_record, services_of
from api.http.schemas import (
    CancelResult,
    ErrorResponse,
    GenerationAccepted,
    GenerationLinks,
    GenerationRequest,
    GenerationView,
    SessionView,
    TokenGrant,
)
from api.http.security import Caller
from api.http.sse import event_stream
from tokenfan.contract.errors import (
    GenerationNotFound,
    InvalidOffset,
    InvalidRequest,
    RateLimited,
    SessionNotFound,
)
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import GENERATION_ID_PATTERN, SESSION_ID_PATTERN
from tokenfan.contract.offsets import OFFSET_MAX_LENGTH, OFFSET_PATTERN, parse_offset
from tokenfan.runtime.settings import Settings
from tokenfan.store import (
    AcceptOutcome,
    GenerationRecord,
)

if TYPE_CHECKING:
    from api.http.app import Services

__all__ = ["router"]

log = structlog.get_logger("tokenfan.api")

SessionId = Annotated[
    str, Path(pattern=SESSION_ID_PATTERN, max_length=128, description="1-128 of A-Z a-z 0-9 . _ -")
]
GenerationId = Annotated[str, Path(pattern=GENERATION_ID_PATTERN, max_length=30)]
# A resume position's grammar is the schema's to state; one that breaks it is answered 400 invalid_offset,
# as parse_offset answers one (api/http/errors.py maps the validation error).
After = Annotated[
    str | None,
    Query(pattern=OFFSET_PATTERN, max_length=OFFSET_MAX_LENGTH, description="resume after this offset"),
]
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        pattern=OFFSET_PATTERN,
        max_length=OFFSET_MAX_LENGTH,
        description="resume after this offset (a browser's EventSource sends it); wins over `after`",
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[A-Za-z0-9._:-]{1,128}$",
        description="Retrying a POST with the same key returns the first generation instead of a second; "
        "the same key with another request is refused (422 idempotency_key_reused).",
    ),
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


def _about(session_id: str | None = None, generation_id: str | None = None) -> None:
    """Name the session and generation a request is about in every log line it leads to, the access log's
    included (docs/OPERATIONS.md): the handler runs in the request's own context."""
    ids = {"session_id": session_id, "generation_id": generation_id}
    structlog.contextvars.bind_contextvars(
        **{name: value for name, value in ids.items() if value is not None}
    )


def _view(record: GenerationRecord) -> GenerationView:
    return GenerationView.model_validate(record.as_json())


def _links(settings: Settings, session_id: str, generation_id: str) -> GenerationLinks:
    relay = settings.public_relay_url
    return GenerationLinks(
        self=f"/v1/generations/{generation_id}",
        session=f"/v1/sessions/{session_id}",
        events=f"/v1/sessions/{session_id}/events",
        stream=f"{relay.rstrip('/')}/v1/sessions/{session_id}/stream" if relay else None,
    )


router = APIRouter()


@router.post(
    "/v1/sessions/{session_id}/generations",
    status_code=202,
    response_model=GenerationAccepted,
    responses=_ERRORS,
    summary="Accept a generation; it runs after the session's earlier ones",
)
async def create_generation(
    session_id: SessionId,
    body: GenerationRequest,
    request: Request,
    response: Response,
    principal: Caller,
    idempotency_key: IdempotencyKey = None,
) -> GenerationAccepted:
    _about(session_id)
    principal.require_service()
    services = services_of(request)
    result = await admit(services, principal.name, session_id, body, idempotency_key)
    status = GenerationStatus.QUEUED
    if result.outcome is AcceptOutcome.DUPLICATE:
        response.headers["Idempotent-Replayed"] = "true"
        record = await services.store.generation(result.generation_id)
        status = record.status if record is not None else status
    response.headers["Location"] = f"/v1/generations/{result.generation_id}"
    _about(session_id, result.generation_id)
    log.info("generation_accepted", outcome=result.outcome.value, queue_position=result.queue_position)
    token, expires_at = _token(services, session_id, principal.name)
    return GenerationAccepted(
        generation_id=result.generation_id,
        session_id=session_id,
        status=status,
        queue_position=result.queue_position,
        links=_links(services.settings, session_id, result.generation_id),
        token=token,
        token_expires_at=expires_at,
    )


def _token(services: Services, session_id: str, minted_by: str) -> tuple[str | None, int | None]:
    if not services.auth.signer:
        return None, None  # development mode without token secrets: nothing to sign with, nothing checked
    token, expires_at = services.auth.signer.mint(session_id, subject=minted_by)
    return token, expires_at


@router.post(
    "/v1/sessions/{session_id}/tokens",
    status_code=201,
    response_model=TokenGrant,
    responses=_ERRORS,
    summary="Mint a short-lived token that lets its holder watch this one session",
)
async def create_token(session_id: SessionId, request: Request, principal: Caller) -> TokenGrant:
    _about(session_id)
    principal.require_service()
    token, expires_at = _token(services_of(request), session_id, principal.name)
    if token is None or expires_at is None:
        raise InvalidRequest("tokens are not configured: set TOKENFAN_TOKEN_SECRETS")
    return TokenGrant(session_id=session_id, token=token, expires_at=expires_at)


@router.get("/v1/generations/{generation_id}", response_model=GenerationView, responses=_ERRORS)
async def get_generation(generation_id: GenerationId, request: Request, principal: Caller) -> GenerationView:
    _about(generation_id=generation_id)
    record = await services_of(request).store.generation(generation_id)
    if record is None or not (principal.is_service or principal.session_id == record.session_id):
        # The same answer for another session's generation: a token must not reveal what exists elsewhere.
        raise GenerationNotFound(f"no generation {generation_id} (unknown or expired)")
    _about(record.session_id)
    return _view(record)


@router.post(
    "/v1/generations/{generation_id}/cancel",
    response_model=CancelResult,
    responses={
        202: {"model": CancelResult, "description": "running: its worker stops it shortly"},
        **_ERRORS,
    },
    summary="Cancel a queued or running generation (a finished one is left as it is)",
)
async def cancel_generation(
    generation_id: GenerationId, request: Request, response: Response, principal: Caller
) -> CancelResult:
    _about(generation_id=generation_id)
    principal.require_service()
    services = services_of(request)
    record = await services.store.generation(generation_id)
    if record is None:
        raise GenerationNotFound(f"no generation {generation_id} (unknown or expired)")
    _about(record.session_id)
    result = await cancel_record(services, record)
    if result.status == "cancelling":
        response.status_code = 202
    return result


@router.get("/v1/sessions/{session_id}", response_model=SessionView, responses=_ERRORS)
async def get_session(session_id: SessionId, request: Request, principal: Caller) -> SessionView:
    _about(session_id)
    principal.require_session(session_id)
    snapshot = await services_of(request).store.snapshot(session_id)
    if snapshot is None:
        raise SessionNotFound(f"no session {session_id} (no generation yet, or expired)")
    return SessionView(
        session_id=session_id,
        offset=str(snapshot.offset) if snapshot.offset is not None else None,
        generations=[_view(record) for record in snapshot.generations],
    )


@router.get(
    "/v1/sessions/{session_id}/events",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "the session's events as Server-Sent Events",
        },
        **_ERRORS,
        410: {"model": ErrorResponse},
    },
    response_class=StreamingResponse,
    summary="Watch a session as Server-Sent Events, resuming from Last-Event-ID or ?after=",
)
async def session_events(
    session_id: SessionId,
    request: Request,
    principal: Caller,
    after: After = None,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    _about(session_id)
    principal.require_session(session_id)
    _check_query(request)
    services = services_of(request)
    address = request.client.host if request.client else "unknown"
    if services.sse_streams[address] >= services.settings.sse_max_streams_per_address:
        raise RateLimited("too many open event streams from your address; close one first", retry_after=5)
    held = last_event_id if last_event_id is not None else after  # the browser resends the original URL
    position = await services.bus.checks.check(session_id, parse_offset(held) if held is not None else None)
    settings = services.settings
    body = event_stream(
        services.bus,
        session_id,
        position,
        max_buffer_bytes=settings.relay_max_buffer_bytes,
        slow_policy=settings.relay_slow_policy,
        keepalive_seconds=settings.sse_keepalive_seconds,
        expires_at=principal.expires_at,
    )
    return StreamingResponse(
        _counted(body, services.sse_streams, address),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _check_query(request: Request) -> None:
    """The event stream's query, as the relay checks it: a misspelt ``after`` ignored would replay the
    whole history to a client that meant to resume."""
    unknown = sorted(set(request.query_params) - {"after", "token"})
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter {unknown[0][:40]!r}: only 'after' and 'token' are accepted"
        )
    if len(request.query_params.getlist("after")) > 1:
        raise InvalidOffset("give 'after' at most once")


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    await services_of(request).store.ping()
    return JSONResponse({"status": "ready"})


async def _counted(body: AsyncIterator[bytes], streams: Counter[str], address: str) -> AsyncIterator[bytes]:
    """`body`, counted among `address`'s open streams while it runs. Counted from its first step, not
    from the request: a response that never starts (the client left at once) must not hold a place."""
    streams[address] += 1
    try:
        async for chunk in body:
            yield chunk
    finally:
        streams[address] -= 1
        if not streams[address]:
            del streams[address]
