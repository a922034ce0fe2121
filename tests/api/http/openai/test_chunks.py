"""A generation's events as chat completion chunks (pure): each row of the mapping, the resume rule, restarts,
and the whole completion; chunks are checked by parsing them as the SDK's own types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from api.http.openai.chunks import ChatStream, sse_block
from api.http.openai.failures import RESTARTED, Failure, failure_of
from tests.support.openai_sdk import sse_events
from tokenfan.contract.offsets import StreamId

GEN = "gen_01M85JSR67842W2YC56KNRN9TW"


def event(kind: str, seq: int, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "session_id": "s", "generation_id": GEN, "seq": seq, **fields}


def stream(**options: Any) -> ChatStream:
    values: dict[str, Any] = {
        "completion_id": "chatcmpl-x",
        "model": "m",
        "created": 7,
        "include_usage": False,
    }
    return ChatStream(**{**values, **options})


def feed(chat: ChatStream, events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The SSE events `events` become, each at position (1, seq)."""
    out = b"".join(chat.take(e, StreamId(1, e["seq"]), f"ep:1-{e['seq']}") for e in events)
    return sse_events([*out.decode().split("\n")])


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
TEXT_RUN = [
    event("generation.started", 1, attempt=1, model="m"),
    event("delta", 2, content="Hel"),
    event("delta", 3, content="lo ✓"),
    event("generation.completed", 4, finish_reason="stop", usage=USAGE, length=7, sha256="…"),
]


def test_text_becomes_a_role_chunk_content_chunks_a_finish_chunk_and_done() -> None:
    events = feed(stream(), TEXT_RUN)
    assert [e["data"] for e in events][-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e["data"]) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello ✓"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]
    assert {(c.id, c.model, c.created, c.object) for c in chunks} == {
        ("chatcmpl-x", "m", 7, "chat.completion.chunk")
    }
    assert [e.get("id") for e in events] == [
        "ep:1-1",
        "ep:1-2",
        "ep:1-3",
        None,
        "ep:1-4",
    ]  # a block's last event


def test_usage_comes_as_its_own_chunk_when_asked_for() -> None:
    events = feed(stream(include_usage=True), TEXT_RUN)
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert all(
        chunk["usage"] is None for chunk in chunks[:-1]
    )  # as OpenAI sends them once usage is asked for
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE


def test_reasoning_content_and_tool_calls_share_one_chunk_per_event() -> None:
    calls = [
        {"index": 0, "id": "call_a", "name": "f", "arguments": '{"x"'},
        {"index": 1, "id": "call_b", "name": "g", "arguments": ""},
        {"index": 0, "arguments": ": 1}"},
    ]
    events = feed(stream(), [event("delta", 1, reasoning="hm", content="ok", tool_calls=calls)])
    (chunk,) = [ChatCompletionChunk.model_validate_json(e["data"]) for e in events]
    delta = chunk.choices[0].delta
    assert (delta.model_extra or {})["reasoning_content"] == "hm"
    assert delta.content == "ok"
    got = [(c.index, c.id, c.type, c.function.name if c.function else None) for c in delta.tool_calls or []]
    assert got == [(0, "call_a", "function", "f"), (1, "call_b", "function", "g"), (0, None, None, None)]


def test_resuming_suppresses_what_the_client_has_and_keeps_the_rest_as_it_was() -> None:
    whole = feed(stream(), TEXT_RUN)
    for cut in range(1, 5):
        resumed = feed(stream(resume_after=StreamId(1, cut)), TEXT_RUN)
        assert resumed == [e for e in whole if _position(e, whole) > cut]


def _position(event: dict[str, str], events: list[dict[str, str]]) -> int:
    """The seq of the block `event` belongs to (a block's id is on its last event)."""
    at = events.index(event)
    return int(next(e["id"] for e in events[at:] if "id" in e).rsplit("-", 1)[1])


@pytest.mark.parametrize(
    ("ending", "status", "code"),
    [
        (
            event("generation.failed", 3, error={"type": "upstream_timeout", "message": "stalled"}),
            504,
            "upstream_timeout",
        ),
        (event("generation.cancelled", 3, reason="interrupted", usage=None), 409, "generation_cancelled"),
    ],
)
def test_a_generation_that_does_not_complete_ends_with_an_error_the_sdk_raises(
    ending: dict[str, Any], status: int, code: str
) -> None:
    chat = stream()
    events = feed(chat, [*TEXT_RUN[:2], ending])
    error = json.loads(events[-1]["data"])["error"]
    assert (error["code"], error["status"]) == (code, status)
    assert set(error) >= {"message", "type", "param", "code"}
    assert chat.ended
    assert chat.failure == Failure(status, code, error["message"])
    assert chat.take(TEXT_RUN[-1], StreamId(1, 9), "ep:1-9") == b""  # nothing after the end


def test_a_restart_before_output_is_invisible_and_after_output_is_an_error() -> None:
    restarted = event("generation.restarted", 2, attempt=2)
    quiet = feed(
        stream(), [TEXT_RUN[0], restarted, event("generation.started", 3, attempt=2, model="m"), TEXT_RUN[1]]
    )
    assert [json.loads(e["data"])["choices"][0]["delta"] for e in quiet] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
    ]
    chat = stream()
    loud = feed(chat, [TEXT_RUN[0], TEXT_RUN[1], event("generation.restarted", 3, attempt=2)])
    assert json.loads(loud[-1]["data"])["error"]["code"] == "generation_restarted"
    assert chat.failure is RESTARTED


def test_a_whole_completion_folds_without_chunks_and_discards_a_restarted_attempt() -> None:
    chat = stream(emit=False)
    run = [
        TEXT_RUN[0],
        event("delta", 2, content="lost"),
        event("generation.restarted", 3, attempt=2),
        event("generation.started", 4, attempt=2, model="m"),
        event(
            "delta",
            5,
            reasoning="r",
            content="kept",
            tool_calls=[{"index": 0, "id": "c", "name": "f", "arguments": "{}"}],
        ),
        event("generation.completed", 6, finish_reason="tool_calls", usage=USAGE),
    ]
    assert b"".join(chat.take(e, StreamId(1, e["seq"]), "o") for e in run) == b""
    completion = ChatCompletion.model_validate(chat.completion())
    message = completion.choices[0].message
    assert message.content == "kept"
    assert (message.model_extra or {})["reasoning_content"] == "r"
    calls = [call.model_dump() for call in message.tool_calls or []]
    assert calls == [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 7


def test_custom_events_make_no_chunk() -> None:
    assert feed(stream(), [event("x.sources", 1, items=[1])]) == []


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"type": "upstream_rejected", "message": "no such model", "status": 404}, 404),
        ({"type": "upstream_rejected", "message": "bad", "status": 400}, 400),
        ({"type": "upstream_rejected", "message": "upstream key", "status": 401}, 502),
        ({"type": "upstream_rejected", "message": "teapot", "status": 418}, 400),
        ({"type": "rate_limited", "message": "slow down", "status": 429}, 429),
        ({"type": "upstream_unavailable", "message": "down"}, 502),
        ({"type": "worker_lost", "message": "gone"}, 503),
        ({"type": "something_new", "message": "?"}, 500),
        (None, 500),
    ],
)
def test_failures_answer_with_the_status_a_gateway_would(error: dict[str, Any] | None, status: int) -> None:
    failure = failure_of({"type": "generation.failed", "error": error})
    assert failure.status == status
    assert failure.error()["type"] == (
        "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    )


def test_an_sse_block_names_its_id_on_its_last_event_only() -> None:
    assert sse_block([b"a", b"b"], "o:1-1") == b"data: a\n\nid: o:1-1\ndata: b\n\n"
    assert sse_block([b"a"]) == b"data: a\n\n"
    assert sse_block([], "o:1-1") == b""
