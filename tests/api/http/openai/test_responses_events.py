"""A generation's events as Responses API events (pure): the sequence the SDK expects for text, reasoning and
function calls, the endings, restarts, and numbers that stay the same whatever the replay. Every event and
Response object is validated strictly against the SDK's own types."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from api.http.openai.responses_events import ResponseEvents, ResponseSse, response_usage
from tests.support.openai_sdk import sse_events
from tokenfan.contract.offsets import StreamId

GEN = "gen_01M85JSR67842W2YC56KNRN9TW"
RID = "resp_01M85JSR67842W2YC56KNRN9TW"
ECHO: dict[str, Any] = {
    "background": True,
    "instructions": "Be brief.",
    "max_output_tokens": None,
    "max_tool_calls": None,
    "metadata": {},
    "model": "m",
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}
USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 9,
    "total_tokens": 14,
    "completion_tokens_details": {"reasoning_tokens": 2},
}
STREAM_EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def event(kind: str, seq: int, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "session_id": "s", "generation_id": GEN, "seq": seq, **fields}


def fold(
    events: list[dict[str, Any]], echo: dict[str, Any] = ECHO
) -> tuple[ResponseEvents, list[dict[str, Any]]]:
    responses = ResponseEvents(RID, echo, created_at=1_700_000_000)
    out = responses.opening()
    for stored in events:
        out += responses.take(stored, StreamId(1_700_000_001_000, stored["seq"]))
    for made in out:
        if made["type"] != "response.cancelled":  # OpenAI's name for it; the SDK has no stream type for it
            STREAM_EVENT.validate_python(made)
    Response.model_validate(responses.response())
    return responses, out


STARTED = event("generation.started", 1, attempt=1, model="m")
COMPLETED = event("generation.completed", 9, finish_reason="stop", usage=USAGE)


def test_text_output_is_the_sequence_the_sdk_expects_numbered_without_gaps() -> None:
    responses, out = fold(
        [STARTED, event("delta", 2, content="Hel"), event("delta", 3, content="lo"), COMPLETED]
    )
    assert [e["type"] for e in out] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert out[0]["response"]["status"] == "queued"  # background mode
    assert out[6]["text"] == "Hello"
    final = Response.model_validate(out[-1]["response"])
    assert (final.status, final.output_text, final.completed_at) == ("completed", "Hello", 1_700_000_001)
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (5, 9, 14)
    assert final.usage.output_tokens_details.reasoning_tokens == 2
    assert responses.response() == out[-1]["response"]


def test_reasoning_then_text_are_two_items_the_first_done_before_the_second_opens() -> None:
    _, out = fold(
        [
            STARTED,
            event("delta", 2, reasoning="think"),
            event("delta", 3, reasoning=" more", content="Hi"),
            COMPLETED,
        ]
    )
    types = [e["type"] for e in out]
    assert types[2:11] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ]
    final = Response.model_validate(out[-1]["response"])
    reasoning, message = final.output
    assert reasoning.type == "reasoning"
    assert [part.text for part in reasoning.content or []] == ["think more"]
    assert message.type == "message"
    assert final.output_text == "Hi"
    assert [item.id for item in final.output] == [f"rs_{GEN[4:]}_0", f"msg_{GEN[4:]}_1"]


def test_parallel_tool_calls_are_function_call_items_done_in_order_at_the_end() -> None:
    calls_1 = [
        {"index": 0, "id": "call_a", "name": "f", "arguments": '{"x":'},
        {"index": 1, "id": "call_b", "name": "g", "arguments": ""},
    ]
    calls_2 = [{"index": 1, "arguments": "{}"}, {"index": 0, "arguments": " 1}"}]
    done = event("generation.completed", 4, finish_reason="tool_calls", usage=USAGE)
    _, out = fold(
        [STARTED, event("delta", 2, tool_calls=calls_1), event("delta", 3, tool_calls=calls_2), done]
    )
    deltas = [
        (e["output_index"], e["delta"]) for e in out if e["type"] == "response.function_call_arguments.delta"
    ]
    assert deltas == [(0, '{"x":'), (1, "{}"), (0, " 1}")]
    finished = [
        (e["output_index"], e["arguments"])
        for e in out
        if e["type"] == "response.function_call_arguments.done"
    ]
    assert finished == [(0, '{"x": 1}'), (1, "{}")]
    final = Response.model_validate(out[-1]["response"])
    assert [(i.type, i.call_id, i.name, i.arguments, i.status) for i in final.output] == [  # type: ignore[union-attr]
        ("function_call", "call_a", "f", '{"x": 1}', "completed"),
        ("function_call", "call_b", "g", "{}", "completed"),
    ]


@pytest.mark.parametrize(
    ("ending", "last", "status"),
    [
        (
            event("generation.failed", 3, error={"type": "rate_limited", "message": "429"}, usage=None),
            "response.failed",
            "failed",
        ),
        (event("generation.cancelled", 3, reason="requested", usage=None), "response.cancelled", "cancelled"),
        (
            event("generation.completed", 3, finish_reason="length", usage=USAGE),
            "response.incomplete",
            "incomplete",
        ),
    ],
)
def test_a_response_that_does_not_complete_closes_its_items_as_incomplete(
    ending: dict[str, Any], last: str, status: str
) -> None:
    responses, out = fold([STARTED, event("delta", 2, content="par"), ending])
    assert out[-1]["type"] == last
    assert out[-1]["response"]["status"] == status
    assert [e["item"]["status"] for e in out if e["type"] == "response.output_item.done"] == ["incomplete"]
    assert responses.ended
    assert responses.take(COMPLETED, StreamId(9, 9)) == []
    if status == "failed":
        assert out[-1]["response"]["error"] == {
            "code": "rate_limit_exceeded",
            "message": "429",
            "type": "rate_limited",
        }
    if status == "incomplete":
        assert out[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_generation_cancelled_while_queued_is_created_then_cancelled() -> None:
    _, out = fold([event("generation.cancelled", 1, reason="requested", usage=None)])
    assert [(e["type"], e["sequence_number"]) for e in out] == [
        ("response.created", 0),
        ("response.cancelled", 1),
    ]


def test_after_a_restart_the_response_holds_only_the_new_attempts_output() -> None:
    run = [
        STARTED,
        event("delta", 2, content="lost"),
        event("generation.restarted", 3, attempt=2),
        event("generation.started", 4, attempt=2, model="m"),
        event("delta", 5, content="kept"),
        COMPLETED,
    ]
    _, out = fold(run)
    assert [e["type"] for e in out].count("response.in_progress") == 1
    final = Response.model_validate(out[-1]["response"])
    assert final.output_text == "kept"
    assert [item.id for item in final.output] == [f"msg_{GEN[4:]}_1"]  # numbered after the discarded one


RUN = [
    STARTED,
    event("delta", 2, reasoning="r"),
    event("delta", 3, content="a", tool_calls=[{"index": 0, "id": "c", "name": "f", "arguments": "{"}]),
    event("delta", 4, content="b", tool_calls=[{"index": 0, "arguments": "}"}]),
    COMPLETED,
]


def replay(starting_after: int) -> list[dict[str, str]]:
    sse = ResponseSse(ResponseEvents(RID, ECHO, created_at=0), starting_after=starting_after)
    raw = sse.opening() + b"".join(sse.take(e, StreamId(1, e["seq"]), "o") for e in RUN)
    return sse_events(raw.decode().split("\n"))


def test_every_replay_numbers_every_event_the_same_and_resumes_exactly_after_starting_after() -> None:
    whole = replay(-1)
    assert [int(e["data"].rsplit('"sequence_number":', 1)[1].rstrip("}")) for e in whole] == list(
        range(len(whole))
    )
    for n in range(len(whole)):
        assert replay(n) == whole[n + 1 :]
    assert all(e["event"] == e["data"].split('"type":"', 1)[1].split('"', 1)[0] for e in whole)


def test_a_fold_that_does_not_emit_still_numbers() -> None:
    sse = ResponseSse(ResponseEvents(RID, ECHO, created_at=0), emit=False)
    assert sse.opening() == b""
    assert b"".join(sse.take(e, StreamId(1, e["seq"]), "o") for e in RUN) == b""
    assert sse.ended
    assert sse.last_sequence == len(replay(-1)) - 1


def test_usage_is_renamed_and_absent_details_are_zero() -> None:
    assert response_usage(None) is None
    assert response_usage(
        {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "estimated": True}
    ) == {
        "input_tokens": 1,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 3,
    }
