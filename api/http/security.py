"""Who is calling the HTTP API: a `Principal` from ``Authorization: Bearer <credential>``, or from a
``token`` query parameter for clients that cannot set headers (a browser's EventSource)."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tokenfan.runtime.auth import Authenticator, Principal

__all__ = ["Caller", "caller"]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key (everything), or a session token (watching that one session)",
)


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[
        str | None,
        Query(max_length=4096, description="a session token, for clients that cannot send headers"),
    ] = None,
) -> Principal:
    auth: Authenticator = request.app.state.services.auth
    if credentials is not None:
        principal = auth.authenticate(credentials.credentials)
    else:
        principal = auth.authenticate(token, in_url=token is not None)
    structlog.contextvars.bind_contextvars(principal=principal.name)  # the access log says who asked
    return principal


Caller = Annotated[Principal, Depends(caller)]
