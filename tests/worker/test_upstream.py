"""The upstream adapter's pure parts: which updates each ``chat.completion.chunk`` adds (tolerating what
real providers send, ignoring what is malformed), and which failure, retryable or not, each openai error becomes.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk

from tokenfan.contract.events import FailureType
from worker.upstream import (
    ContentPiece,
    FinishPiece,
    ReasoningPiece,
    ToolCallPiece,
    UpstreamFailure,
    UsagePiece,
    translate_error,
    updates_from_chunk,
)


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` as the SSE decoder hands it over (decoded JSON), checked against the
    openai package's own schema so that every example is a chunk a real upstream may send."""
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_732_406_400,
        "model": "some-model",
        "choices": choices,
        **extra,
    }
    ChatCompletionChunk.model_validate(payload)
    return payload


def test_content_chunk() -> None:
    update = updates_from_chunk(chunk([{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]))
    assert update == [ContentPiece("Hi")]


def test_reasoning_content_extra_field() -> None:
    updates = updates_from_chunk(
        chunk([{"index": 0, "delta": {"reasoning_content": "Let me think", "content": None}}])
    )
    assert updates == [ReasoningPiece("Let me think")]


def test_reasoning_extra_field() -> None:
    updates = updates_from_chunk(chunk([{"index": 0, "delta": {"reasoning": "hmm", "content": "ok"}}]))
    assert updates == [ReasoningPiece("hmm"), ContentPiece("ok")]


def test_tool_call_pieces() -> None:
    first = chunk(
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_abc",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
            }
        ]
    )
    later = chunk(
        [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}}]
    )
    second_call = chunk(
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 1, "id": "call_def", "function": {"name": "now", "arguments": "{}"}},
                    ]
                },
            }
        ]
    )
    no_function = chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}])
    assert updates_from_chunk(first) == [ToolCallPiece(0, "call_abc", "get_weather", "")]
    assert updates_from_chunk(later) == [ToolCallPiece(0, None, None, '{"city"')]
    assert updates_from_chunk(second_call) == [ToolCallPiece(1, "call_def", "now", "{}")]
    assert updates_from_chunk(no_function) == [ToolCallPiece(0, None, None, "")]


def test_finish_reason() -> None:
    updates = updates_from_chunk(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    assert updates == [FinishPiece("stop")]
    with_text = updates_from_chunk(
        chunk([{"index": 0, "delta": {"content": "."}, "finish_reason": "length"}])
    )
    assert with_text == [ContentPiece("."), FinishPiece("length")]


def test_usage_chunk_without_choices() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    updates = updates_from_chunk(chunk([], usage=usage))
    assert updates == [UsagePiece(usage)]


def test_usage_on_a_content_chunk() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    updates = updates_from_chunk(chunk([{"index": 0, "delta": {"content": "a"}}], usage=usage))
    assert updates == [ContentPiece("a"), UsagePiece(usage)]


def test_empty_delta_adds_nothing() -> None:
    assert updates_from_chunk(chunk([{"index": 0, "delta": {}}])) == []
    assert updates_from_chunk(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])) == []
    assert updates_from_chunk(chunk([{"index": 0, "delta": {"reasoning_content": ""}}])) == []
    assert updates_from_chunk(chunk([])) == []


def test_other_choices_are_ignored() -> None:
    updates = updates_from_chunk(
        chunk(
            [
                {"index": 1, "delta": {"content": "other"}, "finish_reason": "stop"},
                {"index": 0, "delta": {"content": "mine"}},
            ]
        )
    )
    assert updates == [ContentPiece("mine")]


def test_unknown_fields_are_tolerated() -> None:
    updates = updates_from_chunk(
        chunk(
            [
                {
                    "index": 0,
                    "delta": {"content": "x", "provider_specific": {"a": 1}},
                    "logprobs": None,
                    "extra": 1,
                }
            ],
            system_fingerprint="fp_1",
            service_tier="default",
            x_gateway={"region": "eu"},
        )
    )
    assert updates == [ContentPiece("x")]


@pytest.mark.parametrize(
    "malformed",
    [
        None,
        "data",
        [1, 2],
        {"choices": None},
        {"choices": "abc"},
        {"choices": 5},
        {"choices": [5, None, "x"]},
        {"choices": [{"index": 0, "delta": "text"}]},
        {"choices": [{"index": 0, "delta": {"content": 5, "reasoning_content": ["r"]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": 1}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "0", "function": {"name": 1}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": 3}]},
        {"choices": [], "usage": 12},
    ],
)
def test_members_of_the_wrong_type_are_ignored(malformed: object) -> None:
    """The docstring's promise: a malformed member is ignored rather than trusted (or crashed on)."""
    assert updates_from_chunk(malformed) == []


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=5)
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
calls = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(st.integers(0, 2), json_any),
        "id": json_any,
        "function": st.one_of(
            json_any, st.fixed_dictionaries({}, optional={"name": json_any, "arguments": json_any})
        ),
    },
)
delta_members = st.fixed_dictionaries(
    {},
    optional={
        "content": json_any,
        "reasoning_content": json_any,
        "reasoning": json_any,
        "tool_calls": st.one_of(json_leaf, json_any, st.lists(calls, max_size=3)),
    },
)
choice_members = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(st.just(0), json_any),
        "delta": st.one_of(delta_members, json_any),
        "finish_reason": json_any,
    },
)
chunk_like = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.one_of(st.lists(choice_members, max_size=3), json_leaf, json_any),
        "usage": json_any,
    },
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(chunk_like, json_any))
def test_any_decoded_json_gives_well_typed_updates(payload: object) -> None:
    for update in updates_from_chunk(payload):
        if isinstance(update, ContentPiece | ReasoningPiece):
            assert isinstance(update.text, str)
            assert update.text
        elif isinstance(update, ToolCallPiece):
            assert isinstance(update.index, int)
            assert update.call_id is None or isinstance(update.call_id, str)
            assert update.name is None or isinstance(update.name, str)
            assert isinstance(update.arguments, str)
        elif isinstance(update, FinishPiece):
            assert isinstance(update.reason, str)
        else:
            assert isinstance(update.usage, dict)


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
