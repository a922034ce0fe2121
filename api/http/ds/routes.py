"""The ``/ds/`` route: every path a stream; ``sessions/{session_id}`` a session. Authorization as everywhere
(docs/SECURITY.md): API keys create, append, read and delete; a session token reads its session."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Request
from starlette.responses import Response

from api.http.ds import sessions, streams
from api.http.ds.wire import Refusal, refusal_response
from api.http.generations import services_of
from tokenfan.contract.errors import InvalidRequest, InvalidSessionId, MethodNotAllowed, TokenfanError
from tokenfan.contract.ids import is_session_id
from tokenfan.contract.keys import StreamKeys
from tokenfan.runtime.auth import Authenticator, Principal

__all__ = ["DS_PREFIX", "router"]

DS_PREFIX = "/ds/"
_SESSIONS = "sessions/"
_MAX_PATH = 1024
_MAX_TOKEN = 4096  # as the rest of the API takes it (api.http.security)

router = APIRouter()


@router.api_route(
    DS_PREFIX + "{path:path}", methods=["GET", "HEAD", "PUT", "POST", "DELETE"], include_in_schema=False
)
async def durable_stream(path: str, request: Request) -> Response:
    try:
        principal = _caller(request)
        if path.startswith(_SESSIONS):
            return await _session(principal, path[len(_SESSIONS) :], request)
        return await _stream(principal, path, request)
    except Refusal as refusal:
        return refusal_response(refusal, head=request.method == "HEAD")
    except TokenfanError as error:
        return refusal_response(Refusal(error), head=request.method == "HEAD")


def _caller(request: Request) -> Principal:
    """Who is calling, exactly as `api.http.security.caller` decides, without FastAPI's dependency machinery:
    a long-poll reader asks many times a minute, and resolving the dependency cost a fifth of each answer."""
    auth: Authenticator = request.app.state.services.auth
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credential:
        principal = auth.authenticate(credential)
    else:
        token = request.query_params.get("token")
        if token is not None and len(token) > _MAX_TOKEN:
            raise Refusal(InvalidRequest(f"a token has at most {_MAX_TOKEN} characters"))
        principal = auth.authenticate(token, in_url=token is not None)
    structlog.contextvars.bind_contextvars(principal=principal.name)  # the access log says who asked
    return principal


async def _stream(principal: Principal, path: str, request: Request) -> Response:
    principal.require_service()  # a session token reads its session, nothing else
    if not path or len(path) > _MAX_PATH:
        raise Refusal(InvalidRequest(f"a stream's path has 1 to {_MAX_PATH} characters"))
    services, keys, method = services_of(request), StreamKeys(path), request.method
    if method == "PUT":
        return await streams.create(services, principal, keys, request)
    if method == "POST":
        return await streams.append(services, principal, keys, request)
    if method == "GET":
        return await streams.read(services, principal, keys, request)
    if method == "HEAD":
        return await streams.head(services, keys)
    if method == "DELETE":
        return await streams.delete(services, keys)
    raise Refusal(MethodNotAllowed(f"{method} is not a Durable Streams operation"))


async def _session(principal: Principal, session_id: str, request: Request) -> Response:
    if not is_session_id(session_id):
        raise Refusal(InvalidSessionId("not a session id"))
    services, method = services_of(request), request.method
    if method == "GET":
        return await sessions.session_read(services, principal, session_id, request)
    if method == "HEAD":
        return await sessions.session_head(services, principal, session_id)
    if method == "PUT":
        return await sessions.session_create(services, principal, session_id, request)
    return await sessions.session_append(services, principal, session_id, request)
