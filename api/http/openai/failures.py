"""A generation that did not complete, told the way OpenAI tells it. Pure: no I/O.

A chat completion has no "failed" or "cancelled" chunk: OpenAI answers an HTTP error before streaming, or
sends ``data: {"error": {...}}`` mid-stream, which its SDK raises as ``APIError``. `Failure` carries both: the
HTTP status (when nothing was streamed yet) and the error object. Its ``code`` is the generation's
``error.type`` (docs/PROTOCOL.md, "Failed"), or ``generation_cancelled`` / ``generation_restarted``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenfan.contract.errors import error_type
from tokenfan.contract.events import FailureType

__all__ = ["RESTARTED", "Failure", "failure_of"]

#: HTTP status of each failure type, as a gateway in front of the upstream answers it.
_STATUS: dict[str, int] = {
    FailureType.RATE_LIMITED: 429,
    FailureType.UPSTREAM_UNAVAILABLE: 502,
    FailureType.UPSTREAM_TIMEOUT: 504,
    FailureType.UPSTREAM_DISCONNECTED: 502,
    FailureType.UPSTREAM_ERROR: 502,
    FailureType.TIMEOUT: 504,
    FailureType.WORKER_LOST: 503,
    FailureType.INTERNAL: 500,
}
#: What the upstream refused, passed on as the upstream said it (an unknown model is a 404, as at OpenAI).
#: Its 401 and 403 are not: they mean the operator's upstream key is wrong, not the caller's.
_PASSED_ON = frozenset({400, 404, 409, 413, 422})


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    code: str
    message: str

    def error(self) -> dict[str, Any]:
        """The ``error`` object: OpenAI's members and tokenfan's (docs/PROTOCOL.md, Errors)."""
        return {
            "message": self.message,
            "type": error_type(self.status),
            "param": None,
            "code": self.code,
            "status": self.status,
        }


#: Output already streamed, then the worker running the generation was lost: it starts over, and a chat
#: stream cannot take back what it sent.
RESTARTED = Failure(
    503,
    "generation_restarted",
    "the worker running this generation was lost after it had streamed output; the generation started over: "
    "read its result with GET /v1/chat/completions/{id}",
)


def failure_of(event: dict[str, Any]) -> Failure:
    """The failure a ``generation.failed`` or ``generation.cancelled`` event stands for."""
    if event.get("type") == "generation.cancelled":
        return Failure(409, "generation_cancelled", f"the generation was cancelled ({event.get('reason')})")
    error = event.get("error")
    error = error if isinstance(error, dict) else {}
    kind = str(error.get("type", FailureType.INTERNAL))
    message = str(error.get("message", "the generation failed"))
    if kind == FailureType.UPSTREAM_REJECTED:
        upstream = error.get("status")
        status = upstream if upstream in _PASSED_ON else 502 if upstream in (401, 403) else 400
        return Failure(status, kind, message)
    return Failure(_STATUS.get(kind, 500), kind, message)
