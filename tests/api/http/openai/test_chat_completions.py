"""``/v1/chat/completions`` driven only through the official ``openai`` package, sync and async, against the real
processes: what the SDK assembles is exactly what the upstream produced, the generation lives in a session that
subscribers watch, a dropped stream resumes with ``Last-Event-ID``, and a disconnect does not cancel."""

from __future__ import annotations

import asyncio
import re
from typing import Any, cast

import openai
import pytest
from openai import AsyncStream, Stream
from openai.types.chat import ChatCompletionChunk
from redis.asyncio import Redis

from tests.api.http.openai.conftest import KEY
from tests.support.openai_sdk import prompt, sse_events, upstream_completion, upstream_usage
from tests.support.requests import expected_text, new_session_id
from tests.support.stack import RunningStack
from tests.support.watchers import Watcher, finished
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import GENERATION_ID_PATTERN

MODEL = "tokenfan-sim"
UNICODE_PIECES = ["Grüße, ", "世界", " — ", "👩\u200d👩\u200d👧", " e\u0301", "\u00a0𝄞", "!"]
TOOLS: list[dict[str, Any]] = [
    {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'},
    {"name": "get_time", "arguments": '{"timezone": "Europe/Zurich"}', "id": "call_fixed_1"},
]


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def reasoning_of(chunks: list[ChatCompletionChunk]) -> str:
    deltas = [chunk.choices[0].delta.model_extra or {} for chunk in chunks if chunk.choices]
    return "".join(delta.get("reasoning_content") or "" for delta in deltas)


def streamed(answer: object) -> Stream[ChatCompletionChunk]:
    return cast(Stream[ChatCompletionChunk], answer)


def astreamed(answer: object) -> AsyncStream[ChatCompletionChunk]:
    return cast(AsyncStream[ChatCompletionChunk], answer)


def test_a_streamed_completion_assembles_exactly_what_the_upstream_sent(client: openai.OpenAI) -> None:
    messages = prompt("stream me", {"tokens": 40})
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, stream=True)
    chunks = list(streamed(raw.parse()))
    assert content_of(chunks) == expected_text({"model": MODEL, "messages": messages})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)  # no usage chunk unless asked for
    generation_id = raw.headers["x-tokenfan-generation"]
    assert {chunk.id for chunk in chunks} == {"chatcmpl-" + generation_id.removeprefix("gen_")}
    assert raw.headers["x-tokenfan-session"] == "openai-" + generation_id.removeprefix("gen_").lower()
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.model for chunk in chunks} == {MODEL}


async def test_unicode_survives_byte_for_byte(aclient: openai.AsyncOpenAI) -> None:
    messages = prompt("unicode", {"chunks": UNICODE_PIECES})
    stream = await aclient.chat.completions.create(model=MODEL, messages=messages, stream=True)
    chunks = [chunk async for chunk in astreamed(stream)]
    assert content_of(chunks).encode() == "".join(UNICODE_PIECES).encode()
    whole = await aclient.chat.completions.create(model=MODEL, messages=messages)
    assert whole.choices[0].message.content == "".join(UNICODE_PIECES)


async def test_reasoning_streams_as_reasoning_content(aclient: openai.AsyncOpenAI) -> None:
    messages = prompt("think first", {"tokens": 12, "reasoning": ["Let me ", "think ", "about ", "it."]})
    async with aclient.chat.completions.stream(model=MODEL, messages=messages) as stream:
        final = await stream.get_final_completion()
    expected = upstream_completion(messages)["choices"][0]["message"]
    message = final.choices[0].message
    assert message.content == expected["content"]
    assert (
        (message.model_extra or {})["reasoning_content"]
        == expected["reasoning_content"]
        == "Let me think about it."
    )


@pytest.mark.parametrize("parallel", [False, True], ids=["one-after-the-other", "interleaved"])
def test_tool_calls_and_usage_assemble_as_the_upstream_made_them(
    client: openai.OpenAI, parallel: bool
) -> None:
    messages = prompt("call tools", {"tokens": 3, "tool_calls": TOOLS, "parallel": parallel, "tool_chunk": 4})
    with client.chat.completions.stream(
        model=MODEL,
        messages=messages,
        stream_options={"include_usage": True},
        parallel_tool_calls=True,
    ) as stream:
        final = stream.get_final_completion()
    expected = upstream_completion(messages, parallel_tool_calls=True)["choices"][0]
    message = final.choices[0].message
    assert final.choices[0].finish_reason == expected["finish_reason"] == "tool_calls"
    assert message.content == expected["message"]["content"]
    calls = [(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or []]
    assert calls == [
        (call["id"], call["function"]["name"], call["function"]["arguments"])
        for call in expected["message"]["tool_calls"]
    ]
    assert final.usage is not None
    assert final.usage.model_dump(exclude_none=True) == upstream_usage(messages, parallel_tool_calls=True)


async def test_a_whole_completion_is_the_upstreams_completion(aclient: openai.AsyncOpenAI) -> None:
    messages = prompt("all at once", {"tokens": 6, "reasoning": ["hm"], "tool_calls": TOOLS})
    answer = await aclient.chat.completions.create(model=MODEL, messages=messages)
    expected = upstream_completion(messages)
    got = answer.model_dump(exclude_none=True)
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == {
        key: value for key, value in expected["choices"][0]["message"].items() if value is not None
    }
    assert got["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert got["usage"] == expected["usage"]
    retrieved = await aclient.chat.completions.retrieve(answer.id)
    assert retrieved.model_dump() == answer.model_dump()


async def test_the_session_header_puts_it_where_subscribers_watch(
    front: RunningStack, aclient: openai.AsyncOpenAI
) -> None:
    session_id = new_session_id()
    watcher = await Watcher(front.relay_url, session_id).connect(credential=KEY)
    try:
        messages = prompt("watched", {"tokens": 30, "reasoning": ["a", "b"]})
        raw = await aclient.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,
            stream=True,
            extra_headers={"X-Tokenfan-Session": session_id},
        )
        assert raw.headers["x-tokenfan-session"] == session_id
        generation_id = raw.headers["x-tokenfan-generation"]
        chunks = [chunk async for chunk in astreamed(raw.parse())]
        await watcher.receive_until(finished(generation_id))
    finally:
        await watcher.close()
    seen = watcher.transcript().generations[generation_id]  # raises on a gap, a duplicate or a bad digest
    assert seen.status is GenerationStatus.COMPLETED
    assert seen.text == content_of(chunks) == expected_text({"model": MODEL, "messages": messages})
    assert seen.reasoning_text == reasoning_of(chunks) == "ab"


def test_a_dropped_stream_resumes_after_its_last_event_id(client: openai.OpenAI) -> None:
    messages = prompt("resume me", {"tokens": 30, "rate": 300})
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=messages,
        stream=True,
    ) as response:
        generation_id = response.headers["x-tokenfan-generation"]
        lines: list[str] = []
        for line in response.iter_lines():
            lines.append(line)
            if sum(1 for got in lines if got.startswith("id: ")) == 6:
                break  # the client drops here
    events = sse_events([*lines, ""])
    assert all(event["id"].count(":") == 1 for event in events)  # every event names its offset
    first = [openai.types.chat.ChatCompletionChunk.model_validate_json(event["data"]) for event in events]
    rest = client.get(
        f"/chat/completions/chatcmpl-{generation_id.removeprefix('gen_')}",
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=openai.Stream[ChatCompletionChunk],
        options={"params": {"stream": "true"}, "headers": {"Last-Event-ID": events[-1]["id"]}},
    )
    chunks = [*first, *rest]
    assert content_of(chunks) == expected_text({"model": MODEL, "messages": messages})
    assert [chunk.choices[0].delta.role for chunk in chunks if chunk.choices].count("assistant") == 1
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_client_that_leaves_does_not_cancel(aclient: openai.AsyncOpenAI) -> None:
    messages = prompt("leave early", {"tokens": 60, "rate": 200})
    stream = astreamed(await aclient.chat.completions.create(model=MODEL, messages=messages, stream=True))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    completion_id = chunk.id
    await stream.close()  # stop != cancel
    whole = await aclient.chat.completions.retrieve(completion_id)  # answers once the generation has ended
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content == expected_text({"model": MODEL, "messages": messages})


async def test_a_cancel_mid_stream_arrives_as_an_error_the_sdk_raises(
    front: RunningStack, aclient: openai.AsyncOpenAI
) -> None:
    messages = prompt("cancel me", {"tokens": 5000, "rate": 100})
    raw = await aclient.chat.completions.with_raw_response.create(model=MODEL, messages=messages, stream=True)
    generation_id = raw.headers["x-tokenfan-generation"]
    received: list[ChatCompletionChunk] = []

    async def read_and_cancel() -> None:
        async for chunk in astreamed(raw.parse()):
            received.append(chunk)
            if content_of(received) and len(received) == 2:
                cancel = await aclient.post(f"/generations/{generation_id}/cancel", cast_to=object)
                assert cancel == {"generation_id": generation_id, "status": "cancelling", "cancelled": True}

    with pytest.raises(openai.APIError) as failure:
        await read_and_cancel()
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["code"] == "generation_cancelled"
    assert expected_text({"model": MODEL, "messages": messages}).startswith(content_of(received))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_model_the_upstream_refuses_is_its_404(aclient: openai.AsyncOpenAI, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        await aclient.chat.completions.create(model="gpt-nonexistent", messages=prompt("hi"), stream=stream)
    body = failure.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["type"], body["param"]) == ("upstream_rejected", "invalid_request_error", None)
    assert "gpt-nonexistent" in body["message"]


async def generation_index_keys(redis: Redis) -> int:
    return len([key async for key in redis.scan_iter(match="tf:generation:*", count=1000)])


@pytest.mark.parametrize(
    ("members", "status", "code", "param"),
    [
        ({"n": 2}, 400, "unsupported_parameter", "n"),
        ({"n": 0}, 400, "invalid_parameter", "n"),
        ({"temperature": 3}, 400, "invalid_parameter", "temperature"),
        ({"temprature": 1}, 400, "unknown_parameter", "temprature"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, 400, "unsupported_parameter", "audio"),
        ({"logprobs": True}, 400, "unsupported_parameter", "logprobs"),
        ({"stream_options": {"include_usage": True}}, 400, "invalid_parameter", "stream_options"),
        ({"messages": []}, 400, "invalid_parameter", "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_parameter", "messages[0].role"),
        ({"model": None}, 400, "invalid_parameter", "model"),
    ],
    ids=[
        "n-2",
        "n-0",
        "temperature",
        "typo",
        "audio",
        "logprobs",
        "stream-options",
        "no-messages",
        "role",
        "model",
    ],
)
async def test_bad_bodies_are_refused_as_openai_refuses_them_and_store_nothing(
    aclient: openai.AsyncOpenAI, redis: Redis, members: dict[str, Any], status: int, code: str, param: str
) -> None:
    session_id = new_session_id()
    before = await generation_index_keys(redis)
    with pytest.raises(openai.BadRequestError) as failure:
        await aclient.chat.completions.create(
            model=MODEL,
            messages=prompt("hi"),
            extra_body=members,
            extra_headers={"X-Tokenfan-Session": session_id},
        )
    body = failure.value.body
    assert isinstance(body, dict)
    assert (failure.value.status_code, body["code"], body["param"], body["type"]) == (
        status,
        code,
        param,
        "invalid_request_error",
    )
    assert body["message"]
    assert await redis.keys(f"tf:{{{session_id}}}:*") == []
    assert await generation_index_keys(redis) == before


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        ('{"model": "\u00e9'.encode("latin-1"), "invalid_json"),
    ],
    ids=["not-json", "not-an-object", "not-utf8"],
)
def test_malformed_bodies_are_a_400(client: openai.OpenAI, content: bytes, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as failure:
        client.post(
            "/chat/completions",
            cast_to=object,
            content=content,
            options={"headers": {"Content-Type": "application/json"}},
        )
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["code"] == code


def test_a_wrong_key_is_the_sdks_authentication_error(front: RunningStack) -> None:
    stranger = openai.OpenAI(base_url=f"{front.api_url}/v1", api_key="sk-not-ours", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError) as failure:
        stranger.chat.completions.create(model=MODEL, messages=prompt("hi"))
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["code"] == "unauthorized"


async def test_unknown_completion_ids_are_a_404(aclient: openai.AsyncOpenAI) -> None:
    for completion_id in ("chatcmpl-01M85JSR67842W2YC56KNRN9TW", "nope"):
        with pytest.raises(openai.NotFoundError):
            await aclient.chat.completions.retrieve(completion_id)


def test_ids_and_sessions_follow_the_documented_patterns(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=prompt("ids"))
    assert re.fullmatch(GENERATION_ID_PATTERN, raw.headers["x-tokenfan-generation"])
    assert raw.parse().id == "chatcmpl-" + raw.headers["x-tokenfan-generation"].removeprefix("gen_")


async def test_concurrent_requests_in_one_session_run_in_order(aclient: openai.AsyncOpenAI) -> None:
    session_id = new_session_id()
    bodies = [prompt(f"turn {n}", {"tokens": 10}) for n in range(3)]
    answers = await asyncio.gather(
        *(
            aclient.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=body,
                extra_headers={"X-Tokenfan-Session": session_id},
            )
            for body in bodies
        )
    )
    for body, raw in zip(bodies, answers, strict=True):
        assert raw.headers["x-tokenfan-session"] == session_id
        assert raw.parse().choices[0].message.content == expected_text({"model": MODEL, "messages": body})


async def test_a_retried_request_with_an_idempotency_key_answers_the_first_generation(
    aclient: openai.AsyncOpenAI,
) -> None:
    session_id = new_session_id()
    headers = {"X-Tokenfan-Session": session_id, "Idempotency-Key": "order-7"}
    messages = prompt("only once", {"tokens": 15})
    first = await aclient.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, extra_headers=headers
    )
    again = await aclient.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, stream=True, extra_headers=headers
    )
    assert again.headers["x-tokenfan-generation"] == first.headers["x-tokenfan-generation"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    chunks = [chunk async for chunk in astreamed(again.parse())]  # the first one's, from its beginning
    assert (
        content_of(chunks)
        == first.parse().choices[0].message.content
        == expected_text({"model": MODEL, "messages": messages})
    )
    with pytest.raises(openai.BadRequestError):
        await aclient.chat.completions.create(
            model=MODEL, messages=messages, extra_headers={"Idempotency-Key": "not allowed!"}
        )


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"X-Tokenfan-Session": "{braces}"}, "invalid_session_id"),
        ({"Idempotency-Key": "a b"}, "invalid_request"),
    ],
)
async def test_malformed_headers_are_refused_before_anything_is_stored(
    aclient: openai.AsyncOpenAI, redis: Redis, headers: dict[str, str], code: str
) -> None:
    before = await generation_index_keys(redis)
    with pytest.raises(openai.BadRequestError) as failure:
        await aclient.chat.completions.create(model=MODEL, messages=prompt("hi"), extra_headers=headers)
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["code"] == code
    assert await generation_index_keys(redis) == before
