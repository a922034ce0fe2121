"""The HTTP edges of ``/ds/``: request headers parsed once, responses with the headers every answer carries,
and errors as a Durable Streams client expects them (the status, plus the protocol's headers)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from fastapi import Request
from starlette.responses import Response

from api.http.errors import error_response
from tokenfan.contract.errors import (
    InvalidProducer,
    RateLimited,
    ServiceUnavailable,
    TokenfanError,
    Unauthorized,
)
from tokenfan.store.streams import Producer

__all__ = [
    "ALWAYS_HEADERS",
    "DS_REQUEST_HEADERS",
    "DS_RESPONSE_HEADERS",
    "Refusal",
    "answer",
    "parse_producer",
    "refusal_response",
]

#: Every answer: a browser must not sniff a stream's bytes into something else (protocol section 10.7).
ALWAYS_HEADERS = {"X-Content-Type-Options": "nosniff", "Cross-Origin-Resource-Policy": "cross-origin"}
#: What a browser may send and read across origins (CORS), besides the API's own headers.
DS_REQUEST_HEADERS = (
    "If-None-Match",
    "Stream-Seq",
    "Stream-TTL",
    "Stream-Expires-At",
    "Stream-Closed",
    "Producer-Id",
    "Producer-Epoch",
    "Producer-Seq",
    "Stream-Forked-From",
    "Stream-Fork-Offset",
    "Stream-Fork-Sub-Offset",
)
DS_RESPONSE_HEADERS = (
    "Stream-Next-Offset",
    "Stream-Cursor",
    "Stream-Up-To-Date",
    "Stream-Closed",
    "Stream-SSE-Data-Encoding",
    "Producer-Epoch",
    "Producer-Seq",
    "Producer-Expected-Seq",
    "Producer-Received-Seq",
    "ETag",
    "Content-Type",
)
_DIGITS = re.compile(r"^[0-9]{1,16}$")
_MAX_SAFE = (1 << 53) - 1


class Refusal(Exception):
    """A request refused with `error`, answered with the protocol's `headers` besides."""

    def __init__(self, error: TokenfanError, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = dict(headers or {})


def answer(status: int, headers: Mapping[str, str] | None = None, body: bytes = b"") -> Response:
    """A response with the headers every ``/ds/`` answer carries."""
    return Response(body, status_code=status, headers={**ALWAYS_HEADERS, **(headers or {})})


def refusal_response(refusal: Refusal, *, head: bool) -> Response:
    error = refusal.error
    headers = {**ALWAYS_HEADERS, **refusal.headers}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    elif isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(error, ServiceUnavailable):
        headers["Retry-After"] = "1"
    if head:  # a HEAD answer has no body
        return Response(status_code=error.http_status, headers=headers)
    return error_response(error.http_status, error.code, error.message, headers=headers)


def _integer(request: Request, name: str) -> int:
    raw = request.headers[name]
    if not _DIGITS.fullmatch(raw) or int(raw) > _MAX_SAFE:
        raise Refusal(InvalidProducer(f"{name} is a whole number from 0 to 2^53-1"))
    return int(raw)


def parse_producer(request: Request) -> Producer | None:
    """The idempotent producer's three headers, all or none (400 otherwise)."""
    present = [name in request.headers for name in ("producer-id", "producer-epoch", "producer-seq")]
    if not any(present):
        return None
    if not all(present):
        raise Refusal(InvalidProducer("Producer-Id, Producer-Epoch and Producer-Seq go together"))
    producer_id = request.headers["producer-id"]
    if not producer_id:
        raise Refusal(InvalidProducer("Producer-Id must not be empty"))
    return Producer(producer_id, _integer(request, "producer-epoch"), _integer(request, "producer-seq"))
