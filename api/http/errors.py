"""Every HTTP error leaves as ``{"error": {"code", "message", "status", "type", "param", "details"?}}``
(docs/PROTOCOL.md): tokenfan's members, and OpenAI's (``type``, ``param``) so that its SDKs read it too."""

from __future__ import annotations

import math
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenfan.contract.errors import (
    InvalidParameter,
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    TokenfanError,
    Unauthorized,
    error_type,
)
from tokenfan.contract.parameters import NOT_CARRIED

__all__ = ["error_body", "error_response", "install_error_handlers"]

log = structlog.get_logger("tokenfan.api")

_PATH_PARAMETER_CODES = {"session_id": "invalid_session_id", "generation_id": "invalid_generation_id"}
#: Where a resume position travels: one that breaks the offset grammar is a 400 ``invalid_offset``.
_POSITIONS = {("query", "after"), ("header", "Last-Event-ID")}
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The ``error`` object of every HTTP error (and of an OpenAI stream's error event)."""
    return {"code": code, "message": message, "status": status, "type": error_type(status), "param": param}


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    body = error_body(status, code, message, param)
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for error in errors:
        location = tuple(error.get("loc", ()))
        if location[:1] == ("path",) and len(location) > 1 and location[1] in _PATH_PARAMETER_CODES:
            name = str(location[1])
            return error_response(400, _PATH_PARAMETER_CODES[name], f"{name} is malformed: {error['msg']}")
        if error.get("type") == "json_invalid":
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        if location[:2] in _POSITIONS:
            return error_response(
                400, "invalid_offset", "offset must look like '<epoch>:<ms>-<seq>', as received in an event"
            )
    details = [
        {
            "location": [str(part) for part in error.get("loc", ())],
            "message": _message(error),
            "type": error.get("type", ""),
        }
        for error in errors[:20]
    ]
    return error_response(422, "validation_error", "the request body does not match the schema", details)


def _message(error: Any) -> str:
    """pydantic's message, or for a member the schema does not know, why it is refused."""
    location = tuple(error.get("loc", ()))
    if error.get("type") != "extra_forbidden" or len(location) != 2 or location[0] != "body":
        return str(error.get("msg", ""))
    name = str(location[1])
    if name in NOT_CARRIED:
        return f"tokenfan cannot carry {name!r}: {NOT_CARRIED[name]}"
    return f"{name[:40]!r} is not a member tokenfan knows (docs/PROTOCOL.md lists them)"


def install_error_handlers(app: FastAPI) -> None:
    async def on_tokenfan_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TokenfanError)
        headers: dict[str, str] = {}
        if isinstance(exc, ServiceUnavailable):
            log.warning("unavailable", path=request.url.path, error=exc.message, cause=repr(exc.__cause__))
            headers["Retry-After"] = "1"
        elif isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        elif isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        param = exc.param if isinstance(exc, InvalidParameter) else None
        return error_response(exc.http_status, exc.code, exc.message, headers=headers or None, param=param)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(
            exc.status_code, InvalidRequest.code if exc.status_code < 500 else "internal_error"
        )
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return error_response(500, "internal_error", "internal error")

    app.add_exception_handler(TokenfanError, on_tokenfan_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
