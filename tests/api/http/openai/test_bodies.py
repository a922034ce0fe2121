"""OpenAI request bodies (pure): what becomes of each member, and each refusal named as OpenAI names it."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.http.openai.bodies import chat_call, json_object, response_call
from tokenfan.contract.errors import (
    InvalidJson,
    InvalidParameter,
    InvalidRequest,
    UnknownParameter,
    UnsupportedParameter,
)

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_json_object_is_required() -> None:
    assert json_object(b'{"a": 1}') == {"a": 1}
    with pytest.raises(InvalidJson):
        json_object(b"{nope")
    with pytest.raises(InvalidJson):
        json_object(b'"\xff"')
    with pytest.raises(InvalidRequest):
        json_object(b"[]")


def test_a_chat_body_is_a_generation_request_and_how_to_answer() -> None:
    call = chat_call(
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "n": 1, "temperature": 0.5}
    )
    assert (call.stream, call.include_usage) == (True, True)
    assert call.request.model_dump(exclude_none=True, exclude={"policy"}) == {**CHAT, "temperature": 0.5}
    plain = chat_call(CHAT)
    assert (plain.stream, plain.include_usage) == (False, False)


def test_harmless_openai_members_are_dropped_and_tokenfan_extensions_ride_along() -> None:
    body = {
        **CHAT,
        "store": True,
        "modalities": ["text"],
        "logprobs": False,
        "service_tier": "auto",
        "verbosity": None,
    }
    extended = {**body, "policy": "interrupt", "cancel_when_unwatched_seconds": 30, "metadata": {"k": "v"}}
    request = chat_call(extended).request
    assert (request.policy, request.cancel_when_unwatched_seconds, request.metadata) == (
        "interrupt",
        30,
        {"k": "v"},
    )
    assert "store" not in request.model_dump()


@pytest.mark.parametrize(
    ("members", "error", "param"),
    [
        ({"n": 3}, UnsupportedParameter, "n"),
        ({"n": True}, InvalidParameter, "n"),
        ({"stream": "yes"}, InvalidParameter, "stream"),
        ({"stream_options": {"include_usage": True}}, InvalidParameter, "stream_options"),
        ({"stream": True, "stream_options": {"bogus": 1}}, InvalidParameter, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "y"}}, InvalidParameter, "stream_options"),
        ({"modalities": ["text", "audio"]}, UnsupportedParameter, "modalities"),
        ({"functions": [{"name": "f"}]}, UnsupportedParameter, "functions"),
        ({"web_search_options": {}}, UnsupportedParameter, "web_search_options"),
        ({"temprature": 1}, UnknownParameter, "temprature"),
        ({"top_p": 2}, InvalidParameter, "top_p"),
        ({"messages": [{"role": "user", "content": 5}]}, InvalidParameter, "messages[0].content"),
        ({"model": ""}, InvalidParameter, "model"),
    ],
)
def test_chat_refusals_name_the_member(
    members: dict[str, Any], error: type[InvalidParameter], param: str
) -> None:
    with pytest.raises(error) as caught:
        chat_call({**CHAT, **members})
    assert type(caught.value) is error
    assert caught.value.param == param
    assert caught.value.message


def test_a_missing_member_is_named() -> None:
    with pytest.raises(InvalidParameter, match="Missing required parameter: 'messages'") as caught:
        chat_call({"model": "m"})
    assert caught.value.param == "messages"


RESPONSE: dict[str, Any] = {"model": "m", "input": "hello"}


def test_a_response_body_becomes_a_chat_request_and_its_echo() -> None:
    call = response_call(
        {
            **RESPONSE,
            "instructions": "Be brief.",
            "background": True,
            "stream": True,
            "max_output_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "user": "u1",
            "metadata": {"k": "v"},
            "reasoning": {"effort": "low"},
            "text": {
                "format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}
            },
            "store": True,
            "truncation": "disabled",
            "include": [],
        }
    )
    assert (call.stream, call.background) == (True, True)
    assert call.request.model_dump(exclude_none=True, exclude={"policy"}) == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 50,
        "user": "u1",
        "metadata": {"k": "v"},
        "reasoning_effort": "low",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True},
        },
    }
    assert call.echo["instructions"] == "Be brief."
    assert call.echo["reasoning"] == {"effort": "low", "summary": None}
    assert (call.echo["max_output_tokens"], call.echo["background"], call.echo["store"]) == (50, True, True)


def test_response_defaults_are_openais() -> None:
    echo = response_call(RESPONSE).echo
    assert (echo["temperature"], echo["top_p"], echo["tool_choice"], echo["parallel_tool_calls"]) == (
        1.0,
        1.0,
        "auto",
        True,
    )
    assert (echo["tools"], echo["metadata"], echo["text"]) == ([], {}, {"format": {"type": "text"}})
    assert echo["background"] is False


def test_input_items_become_chat_messages_calls_and_tool_results() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "weather "},
                {"type": "input_text", "text": "in Bern?"},
            ],
        },
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Bern"}'},
        {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "and this?"},
                {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
            ],
        },
    ]
    tools = [
        {
            "type": "function",
            "name": "weather",
            "description": "d",
            "parameters": {"type": "object"},
            "strict": True,
        }
    ]
    request = response_call(
        {**RESPONSE, "input": items, "tools": tools, "tool_choice": {"type": "function", "name": "weather"}}
    ).request
    dumped = request.model_dump(exclude_none=True)
    assert dumped["messages"] == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "weather in Bern?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Bern"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is sunny."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and this?"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
    ]
    assert dumped["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            },
        }
    ]
    assert dumped["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


@pytest.mark.parametrize(
    ("members", "error", "param"),
    [
        ({"store": False}, UnsupportedParameter, "store"),
        ({"previous_response_id": "resp_x"}, UnsupportedParameter, "previous_response_id"),
        ({"truncation": "auto"}, UnsupportedParameter, "truncation"),
        ({"include": ["reasoning.encrypted_content"]}, UnsupportedParameter, "include"),
        ({"stream_options": {"include_usage": True}}, UnsupportedParameter, "stream_options"),
        ({"tools": [{"type": "web_search"}]}, UnsupportedParameter, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, InvalidParameter, "tools[0].name"),
        ({"tool_choice": {"type": "file_search"}}, UnsupportedParameter, "tool_choice"),
        ({"reasoning": {"effort": "low", "summary": "auto"}}, UnsupportedParameter, "reasoning.summary"),
        ({"text": {"verbosity": "low"}}, UnsupportedParameter, "text.verbosity"),
        ({"text": {"format": {"type": "grammar"}}}, UnsupportedParameter, "text.format.type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, UnsupportedParameter, "input[0].type"),
        ({"input": [{"role": "robot", "content": "x"}]}, InvalidParameter, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            UnsupportedParameter,
            "input[0].content[0].type",
        ),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            InvalidParameter,
            "input[0].call_id",
        ),
        ({"input": 5}, InvalidParameter, "input"),
        ({"temperature": 5}, InvalidParameter, "temperature"),
        ({"max_output_tokens": 0}, InvalidParameter, "max_output_tokens"),
        ({"modalities": ["text"]}, UnknownParameter, "modalities"),
    ],
)
def test_response_refusals_name_the_member(
    members: dict[str, Any], error: type[InvalidParameter], param: str
) -> None:
    with pytest.raises(error) as caught:
        response_call({**RESPONSE, **members})
    assert type(caught.value) is error
    assert caught.value.param == param


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
CHAT_MEMBERS = st.sampled_from(
    [
        "model",
        "messages",
        "stream",
        "stream_options",
        "n",
        "tools",
        "tool_choice",
        "store",
        "temperature",
        "audio",
    ]
)
RESPONSE_MEMBERS = st.sampled_from(
    [
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "reasoning",
        "stream_options",
        "store",
        "include",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([CHAT, RESPONSE]),
    members=st.dictionaries(CHAT_MEMBERS | RESPONSE_MEMBERS, JSON, max_size=4),
)
def test_any_body_is_accepted_or_refused_as_an_invalid_request_never_anything_else(
    base: dict[str, Any], members: dict[str, Any]
) -> None:
    body = {**base, **members}
    for check in (chat_call, response_call):
        with contextlib.suppress(InvalidRequest):
            check(body)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(0, 100_000)))
def test_any_bytes_are_a_json_object_or_refused(raw: bytes) -> None:
    with contextlib.suppress(InvalidRequest):
        assert isinstance(json_object(raw), dict)
