"""The Responses API in background mode, driven only through the official ``openai`` package against the real
processes: a stream dropped anywhere resumes with ``starting_after`` to exactly the full text, numbers stay
gap-free across resumes, a cancel reaches the upstream, and bad input is refused without storing anything."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httpx
import openai
import pytest
from openai import AsyncStream, Stream
from openai.types.responses import ResponseStreamEvent
from redis.asyncio import Redis

from tests.support.openai_sdk import upstream_reply
from tests.support.requests import expected_text, new_session_id
from tests.support.stack import RunningStack
from tests.support.waiting import wait_for_condition

MODEL = "tokenfan-sim"


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def stream_of(answer: object) -> Stream[ResponseStreamEvent]:
    return cast(Stream[ResponseStreamEvent], answer)


def astream_of(answer: object) -> AsyncStream[ResponseStreamEvent]:
    return cast(AsyncStream[ResponseStreamEvent], answer)


def text_of(events: list[ResponseStreamEvent]) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


def test_a_background_stream_is_the_event_sequence_the_sdk_expects(client: openai.OpenAI) -> None:
    text = 'tell me <<sim {"tokens": 12}>>'
    events = list(stream_of(client.responses.create(model=MODEL, input=text, background=True, stream=True)))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len([e for e in events if e.type == "response.output_text.delta"]),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert text_of(events) == expected_text({"model": MODEL, "messages": user(text)})
    created, completed = events[0], events[-1]
    assert created.type == "response.created"
    assert created.response.status == "queued"
    assert completed.type == "response.completed"
    final = completed.response
    assert (final.status, final.background, final.output_text) == ("completed", True, text_of(events))
    reply = upstream_reply(user(text))
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (reply.prompt_tokens, len(reply.content))
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()


async def test_a_stream_dropped_anywhere_resumes_to_exactly_the_full_text(
    aclient: openai.AsyncOpenAI,
) -> None:
    text = 'resume me <<sim {"tokens": 20, "rate": 400}>>'
    events: list[ResponseStreamEvent] = []
    async with astream_of(
        await aclient.responses.create(model=MODEL, input=text, background=True, stream=True)
    ) as s:
        async for event in s:
            events.append(event)
            if len([e for e in events if e.type == "response.output_text.delta"]) == 3:
                break  # the connection drops here
    response_id = events[0].response.id  # type: ignore[union-attr]
    rest = astream_of(
        await aclient.responses.retrieve(response_id, stream=True, starting_after=events[-1].sequence_number)
    )
    events += [event async for event in rest]
    assert [event.sequence_number for event in events] == list(range(len(events)))  # no gap, no repeat
    assert text_of(events) == expected_text({"model": MODEL, "messages": user(text)})
    # The same numbers and the same events whichever event a client stopped after.
    for cut in range(len(events)):
        again = astream_of(await aclient.responses.retrieve(response_id, stream=True, starting_after=cut))
        assert [event.model_dump() async for event in again] == [
            event.model_dump() for event in events[cut + 1 :]
        ]


def test_instructions_and_a_message_list_reach_the_upstream_as_a_conversation(client: openai.OpenAI) -> None:
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": 'Weiter, bitte — ✓ <<sim {"tokens": 9}>>'}],
        },
    ]
    response = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=cast(Any, turns),
        temperature=0.3,
        max_output_tokens=100,
    )
    assert response.status == "completed"
    upstream = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": 'Weiter, bitte — ✓ <<sim {"tokens": 9}>>'},
    ]
    assert response.output_text == expected_text({"model": MODEL, "messages": upstream})
    assert (response.instructions, response.temperature, response.max_output_tokens) == (
        "Be brief.",
        0.3,
        100,
    )


def test_reasoning_and_parallel_function_calls_come_in_their_responses_shapes(client: openai.OpenAI) -> None:
    calls = [
        {"name": "get_weather", "arguments": '{"city": "Bern"}'},
        {"name": "get_time", "arguments": "{}"},
    ]
    text = f'tools <<sim {{"tokens": 2, "reasoning": ["I should ", "call tools."], "tool_calls": {__import__("json").dumps(calls)}, "parallel": true}}>>'
    tools: list[Any] = [
        {"type": "function", "name": c["name"], "parameters": {"type": "object"}} for c in calls
    ]
    events = list(
        stream_of(client.responses.create(model=MODEL, input=text, tools=tools, background=True, stream=True))
    )
    final = client.responses.retrieve(events[0].response.id)  # type: ignore[union-attr]
    reply = upstream_reply(
        user(text),
        tools=[
            {"type": "function", "function": {"name": c["name"], "parameters": {"type": "object"}}}
            for c in calls
        ],
    )
    kinds = [item.type for item in final.output]
    assert kinds == ["reasoning", "message", "function_call", "function_call"]
    reasoning = final.output[0]
    assert reasoning.type == "reasoning"
    assert [part.text for part in reasoning.content or []] == ["".join(reply.reasoning)]
    assert final.output_text == "".join(reply.content)
    assert [(i.call_id, i.name, i.arguments) for i in final.output[2:]] == [  # type: ignore[union-attr]
        (reply.tool_call_id(n), call.name, call.arguments) for n, call in enumerate(reply.tool_calls)
    ]
    streamed_arguments = {
        e.output_index: e.arguments for e in events if e.type == "response.function_call_arguments.done"
    }
    assert streamed_arguments == {2: calls[0]["arguments"], 3: calls[1]["arguments"]}
    assert final.tools[0].name == "get_weather"  # type: ignore[union-attr]


async def simulator_stats(stack: RunningStack) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=stack.simulator_url) as http:
        stats: dict[str, int] = (await http.get("/_sim/stats")).json()
        return stats


async def test_a_cancel_reaches_the_upstream_and_ends_the_stream(
    stack: RunningStack, aclient: openai.AsyncOpenAI
) -> None:
    before = await simulator_stats(stack)
    text = 'a long one <<sim {"tokens": 5000, "rate": 100}>>'
    events: list[ResponseStreamEvent] = []
    stream = astream_of(await aclient.responses.create(model=MODEL, input=text, background=True, stream=True))
    async with stream:
        async for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta":
                cancelled = await aclient.responses.cancel(events[0].response.id)  # type: ignore[union-attr]
                assert cancelled.status == "cancelled"
    assert events[-1].type == "response.cancelled"  # type: ignore[comparison-overlap]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    # The provider saw its request closed: the simulator counted a client that went away mid-stream.
    await wait_for_condition(lambda: _disconnected_since(stack, before["streams_disconnected"]), timeout=10)
    again = await aclient.responses.retrieve(cancelled.id)
    assert again.status == "cancelled"
    assert expected_text({"model": MODEL, "messages": user(text)}).startswith(again.output_text)
    assert (
        await aclient.responses.cancel(cancelled.id)
    ).status == "cancelled"  # cancelling twice changes nothing


async def _disconnected_since(stack: RunningStack, count: int) -> bool:
    return (await simulator_stats(stack))["streams_disconnected"] > count


async def test_a_background_response_is_queued_then_retrieved_completed(aclient: openai.AsyncOpenAI) -> None:
    text = 'later <<sim {"tokens": 7}>>'
    queued = await aclient.responses.create(model=MODEL, input=text, background=True)
    assert queued.status == "queued"
    assert queued.output == []
    events = [event async for event in astream_of(await aclient.responses.retrieve(queued.id, stream=True))]
    assert events[-1].type == "response.completed"  # the stream ends with the response
    done = await aclient.responses.retrieve(queued.id)
    assert done.status == "completed"
    assert done.output_text == expected_text({"model": MODEL, "messages": user(text)})


async def test_a_foreground_response_waits_for_the_end(aclient: openai.AsyncOpenAI) -> None:
    response = await aclient.responses.create(model=MODEL, input='now <<sim {"tokens": 5}>>')
    assert (response.status, response.background) == ("completed", False)


async def test_a_model_the_upstream_refuses_fails_the_response(aclient: openai.AsyncOpenAI) -> None:
    events = [
        e
        async for e in astream_of(
            await aclient.responses.create(model="gpt-nonexistent", input="hi", background=True, stream=True)
        )
    ]
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "invalid_prompt"
    assert "gpt-nonexistent" in failed.response.error.message


@pytest.mark.parametrize("call", ["retrieve", "stream", "cancel"])
@pytest.mark.parametrize(
    "response_id", ["resp_01M85JSR67842W2YC56KNRN9TW", "resp_nope", "gen_01M85JSR67842W2YC56KNRN9TW"]
)
async def test_unknown_response_ids_are_a_404(
    aclient: openai.AsyncOpenAI, call: str, response_id: str
) -> None:
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "retrieve": lambda: aclient.responses.retrieve(response_id),
        "stream": lambda: aclient.responses.retrieve(response_id, stream=True, starting_after=0),
        "cancel": lambda: aclient.responses.cancel(response_id),
    }
    with pytest.raises(openai.NotFoundError) as failure:
        await calls[call]()
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["code"] == "response_not_found"


async def test_a_chat_completion_is_not_a_response(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.retrieve("resp_" + completion.id.removeprefix("chatcmpl-"))


@pytest.mark.parametrize("starting_after", [-1, "x", 10_000])
async def test_starting_after_out_of_range_is_a_clear_400(
    aclient: openai.AsyncOpenAI, starting_after: Any
) -> None:
    done = await aclient.responses.create(model=MODEL, input='short <<sim {"tokens": 3}>>')
    with pytest.raises(openai.BadRequestError) as failure:
        await aclient.responses.retrieve(done.id, stream=True, extra_query={"starting_after": starting_after})
    body = failure.value.body
    assert isinstance(body, dict)
    assert (body["param"], body["type"]) == ("starting_after", "invalid_request_error")
    last = len([e async for e in astream_of(await aclient.responses.retrieve(done.id, stream=True))]) - 1
    nothing_more = astream_of(await aclient.responses.retrieve(done.id, stream=True, starting_after=last))
    assert [e async for e in nothing_more] == []  # the last one itself is a valid place to resume


async def generation_index_keys(redis: Redis) -> int:
    return len([key async for key in redis.scan_iter(match="tf:generation:*", count=1000)])


@pytest.mark.parametrize(
    ("members", "code", "param"),
    [
        ({"store": False}, "unsupported_parameter", "store"),
        (
            {"previous_response_id": "resp_01M85JSR67842W2YC56KNRN9TW"},
            "unsupported_parameter",
            "previous_response_id",
        ),
        ({"tools": [{"type": "web_search"}]}, "unsupported_parameter", "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "unsupported_parameter", "input[0].type"),
        ({"temperature": 5}, "invalid_parameter", "temperature"),
        ({"colour": "blue"}, "unknown_parameter", "colour"),
    ],
)
async def test_bad_bodies_are_refused_and_store_nothing(
    aclient: openai.AsyncOpenAI, redis: Redis, members: dict[str, Any], code: str, param: str
) -> None:
    session_id = new_session_id()
    before = await generation_index_keys(redis)
    with pytest.raises(openai.BadRequestError) as failure:
        await aclient.responses.create(
            model=MODEL,
            input="hi",
            background=True,
            extra_body=members,
            extra_headers={"X-Tokenfan-Session": session_id},
        )
    body = failure.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == (code, param)
    assert await redis.keys(f"tf:{{{session_id}}}:*") == []
    assert await generation_index_keys(redis) == before


async def test_a_response_lives_in_the_session_it_was_given(aclient: openai.AsyncOpenAI) -> None:
    session_id = new_session_id()
    raw = await aclient.responses.with_raw_response.create(
        model=MODEL, input="in a session", extra_headers={"X-Tokenfan-Session": session_id}
    )
    assert raw.headers["x-tokenfan-session"] == session_id
    response = raw.parse()
    assert response.id == "resp_" + raw.headers["x-tokenfan-generation"].removeprefix("gen_")
    session = await aclient.get(f"/sessions/{session_id}", cast_to=object)
    assert [g["generation_id"] for g in session["generations"]] == [raw.headers["x-tokenfan-generation"]]  # type: ignore[index]


async def test_concurrent_resumes_of_one_response_agree(aclient: openai.AsyncOpenAI) -> None:
    done = await aclient.responses.create(model=MODEL, input='shared <<sim {"tokens": 30, "rate": 400}>>')

    async def read(after: int | None) -> list[dict[str, Any]]:
        if after is None:
            stream = astream_of(await aclient.responses.retrieve(done.id, stream=True))
        else:
            stream = astream_of(await aclient.responses.retrieve(done.id, stream=True, starting_after=after))
        return [event.model_dump() async for event in stream]

    whole = await read(None)
    middle, late = len(whole) // 3, 2 * len(whole) // 3
    parts = await asyncio.gather(read(middle), read(late), read(middle), read(None))
    assert parts[0] == parts[2] == whole[middle + 1 :]
    assert parts[1] == whole[late + 1 :]
    assert parts[3] == whole
