"""The upstream adapter's pure parts: which failure, retryable or not, each openai error becomes, and the body
each accepted request is sent as. (What each chunk adds is tests/worker/test_chunks.py's.)
"""

from __future__ import annotations

import httpx2
import openai
import pytest

from tokenfan.contract.events import FailureType
from worker.upstream import UpstreamFailure, translate_error

REQUEST = httpx2.Request("POST", "http://upstream.test/v1/chat/completions")


def response(status: int, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, request=REQUEST, headers=headers or {})


def test_rate_limit_is_retryable_and_honours_retry_after() -> None:
    exc = openai.RateLimitError("rate limited", response=response(429, {"retry-after": "2"}), body=None)
    failure = translate_error(exc)
    assert failure.failure is FailureType.RATE_LIMITED
    assert failure.retryable
    assert failure.status == 429
    assert failure.retry_after == 2.0
    assert "429" in failure.message
    assert failure.to_error() == {"type": "rate_limited", "message": failure.message, "status": 429}


def test_timeout_and_connection_errors_are_retryable() -> None:
    timeout = translate_error(openai.APITimeoutError(request=REQUEST))
    assert timeout.failure is FailureType.UPSTREAM_TIMEOUT
    assert timeout.retryable
    assert timeout.status is None
    assert timeout.retry_after is None
    assert timeout.to_error() == {"type": "upstream_timeout", "message": timeout.message}
    broken = translate_error(openai.APIConnectionError(request=REQUEST))
    assert broken.failure is FailureType.UPSTREAM_DISCONNECTED
    assert broken.retryable
    assert broken.status is None


def test_bad_request_is_rejected_and_not_retried() -> None:
    body = {"error": {"message": "model 'nope' does not exist", "type": "invalid_request_error"}}
    exc = openai.BadRequestError("Error code: 400", response=response(400), body=body)
    failure = translate_error(exc)
    assert failure.failure is FailureType.UPSTREAM_REJECTED
    assert not failure.retryable
    assert failure.status == 400
    assert failure.retry_after is None
    assert failure.message == "upstream answered HTTP 400: model 'nope' does not exist"


def test_service_unavailable_is_retryable() -> None:
    exc = openai.InternalServerError("unavailable", response=response(503, {"Retry-After": "1.5"}), body=None)
    failure = translate_error(exc)
    assert failure.failure is FailureType.UPSTREAM_UNAVAILABLE
    assert failure.retryable
    assert failure.status == 503
    assert failure.retry_after == 1.5
    assert failure.message == "upstream answered HTTP 503: unavailable"


@pytest.mark.parametrize(
    ("status", "failure_type", "retryable"),
    [
        (401, FailureType.UPSTREAM_REJECTED, False),
        (404, FailureType.UPSTREAM_REJECTED, False),
        (408, FailureType.UPSTREAM_UNAVAILABLE, True),
        (422, FailureType.UPSTREAM_REJECTED, False),
        (500, FailureType.UPSTREAM_UNAVAILABLE, True),
        (502, FailureType.UPSTREAM_UNAVAILABLE, True),
    ],
)
def test_status_codes(status: int, failure_type: FailureType, retryable: bool) -> None:
    failure = translate_error(openai.APIStatusError("x", response=response(status), body=None))
    assert failure.failure is failure_type
    assert failure.retryable is retryable
    assert failure.status == status


@pytest.mark.parametrize(
    ("raw", "expected"), [("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-3", 0.0), ("0", 0.0)]
)
def test_retry_after_shapes(raw: str, expected: float | None) -> None:
    exc = openai.RateLimitError("slow", response=response(429, {"retry-after": raw}), body=None)
    assert translate_error(exc).retry_after == expected


def test_generic_api_error_uses_the_body_message() -> None:
    exc = openai.APIError(
        "An error occurred during streaming", REQUEST, body={"error": {"message": "overloaded"}}
    )
    failure = translate_error(exc)
    assert failure.failure is FailureType.UPSTREAM_ERROR
    assert not failure.retryable
    assert failure.status is None
    assert failure.message == "upstream error: overloaded"
    flat = openai.APIError("stream broke", REQUEST, body={"message": "flat body"})
    assert translate_error(flat).message == "upstream error: flat body"
    opaque = openai.APIError("stream broke", REQUEST, body="not json")
    assert translate_error(opaque).message == "upstream error: stream broke"


def test_long_upstream_messages_are_capped() -> None:
    exc = openai.APIError("x", REQUEST, body={"error": {"message": "y" * 5000}})
    assert len(translate_error(exc).message) <= len("upstream error: ") + 500


def test_other_exceptions_are_internal_and_upstream_failures_pass_through() -> None:
    failure = translate_error(ValueError("bug"))
    assert failure.failure is FailureType.INTERNAL
    assert not failure.retryable
    assert "ValueError" in failure.message
    original = UpstreamFailure(FailureType.UPSTREAM_ERROR, "kept", retryable=True)
    assert translate_error(original) is original
