"""OpenAI request bodies, checked the way OpenAI checks them and turned into a tokenfan generation request.
Pure: no I/O.

A chat completions body is already a generation request, give or take the members that shape the HTTP
answer (``stream``, ``stream_options``, ``n``). A Responses body is mapped onto one: ``instructions`` become a
system message, ``input`` items become chat messages, Responses tools and ``text.format`` become their chat
equivalents. Either way the result is validated by `GenerationRequest`, the schema of the native route, so
the worker runs both exactly as it runs any other generation.

What is refused, and how (docs/PROTOCOL.md, "OpenAI front door"): a member no API knows is
`UnknownParameter`; a member OpenAI knows that tokenfan cannot carry (or a value of one, such as ``n`` above
1) is `UnsupportedParameter`; a malformed value is `InvalidParameter`. Each names its ``param`` as OpenAI
does (``messages[0].role``). tokenfan's own ``policy`` and ``cancel_when_unwatched_seconds`` may ride along
(the SDK's ``extra_body``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.http.schemas import GenerationRequest
from tokenfan.contract.errors import (
    InvalidJson,
    InvalidParameter,
    InvalidRequest,
    UnknownParameter,
    UnsupportedParameter,
)

__all__ = ["ChatCall", "ResponseCall", "chat_call", "json_object", "response_call"]

Model = TypeVar("Model", bound=BaseModel)

#: OpenAI chat members tokenfan cannot carry to the upstream, with the values that change nothing (beside
#: null, always accepted): those are dropped, any other value is refused.
_CHAT_HARMLESS: dict[str, tuple[Any, ...]] = {
    "store": (True, False),  # every generation is kept for the session's retention anyway
    "modalities": (["text"],),
    "logprobs": (False,),
    "service_tier": ("auto", "default"),
    "audio": (),
    "function_call": (),
    "functions": (),
    "moderation": (),
    "prediction": (),
    "prompt_cache_key": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
    "safety_identifier": (),
    "top_logprobs": (),
    "verbosity": (),
    "web_search_options": (),
}
#: The same for a Responses body.
_RESPONSES_HARMLESS: dict[str, tuple[Any, ...]] = {
    "store": (True,),  # a response is always stored: ``store: false`` cannot be honoured
    "service_tier": ("auto", "default"),
    "truncation": ("disabled",),
    "include": ([],),
    "stream_options": (),  # checked below: only include_obfuscation, which is moot here
    "access_programs": (),
    "background_options": (),
    "context_management": (),
    "conversation": (),
    "image": (),
    "max_tool_calls": (),
    "moderation": (),
    "previous_response_id": (),
    "prompt": (),
    "prompt_cache_key": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
    "safety_identifier": (),
    "top_logprobs": (),
}
_WHY = {
    "n": "tokenfan runs one completion per request: 'n' must be 1",
    "store": "a response is always stored for the session's retention: 'store' cannot be false",
    "previous_response_id": "send the whole conversation as 'input' instead",
}


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; raises `InvalidJson` or `InvalidRequest`."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, and nesting past the stack
        raise InvalidJson("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def _drop_harmless(body: dict[str, Any], harmless: dict[str, tuple[Any, ...]]) -> None:
    for name, allowed in harmless.items():
        if name in body:
            value = body.pop(name)
            if value is not None and value not in allowed:
                why = _WHY.get(name, f"tokenfan cannot carry {name!r} to the upstream")
                raise UnsupportedParameter(f"Unsupported parameter: {why}.", param=name)


#: What pydantic puts in a location for the branch of a union it tried (``str``, ``list[...]``): not a member.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|.*\[.*)$")


def _param(location: tuple[Any, ...], renames: dict[str, str]) -> str:
    """OpenAI's name of a member at a pydantic error location: ``messages[0].content``."""
    members = [part for part in location if isinstance(part, int) or not _UNION_BRANCH.match(str(part))]
    parts = [renames.get(str(members[0]), str(members[0]))] if members else [""]
    for part in members[1:]:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts)


def _validated(model: type[Model], request: dict[str, Any], renames: dict[str, str] | None = None) -> Model:
    """`model` of `request`; its first problem raised as OpenAI names it."""
    try:
        return model.model_validate(request)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param(tuple(error.get("loc", ())), renames or {})
        if error["type"] == "extra_forbidden":
            raise UnknownParameter(f"Unrecognized request argument supplied: {param}", param=param) from None
        if error["type"] == "missing":
            raise InvalidParameter(f"Missing required parameter: '{param}'.", param=param) from None
        raise InvalidParameter(f"Invalid '{param}': {error['msg']}.", param=param) from None


# --------------------------------------------------------------------------------------- chat completions


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A checked ``POST /v1/chat/completions``: the generation to accept, and how to answer."""

    request: GenerationRequest
    stream: bool
    include_usage: bool


def chat_call(body: dict[str, Any]) -> ChatCall:
    """Check a chat completions body (a JSON object); raises an `InvalidRequest` naming the problem."""
    body = dict(body)
    stream = body.pop("stream", None)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidParameter("Invalid 'stream': expected a boolean.", param="stream")
    include_usage = _stream_options(body.pop("stream_options", None), bool(stream))
    n = body.pop("n", None)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise InvalidParameter("Invalid 'n': expected an integer of at least 1.", param="n")
    if n is not None and n > 1:
        raise UnsupportedParameter(f"Unsupported value: {_WHY['n']}.", param="n")
    _drop_harmless(body, _CHAT_HARMLESS)
    return ChatCall(_validated(GenerationRequest, body), bool(stream), include_usage)


def _stream_options(options: Any, stream: bool) -> bool:
    """Whether the usage chunk was asked for."""
    if options is None:
        return False
    if not stream:
        raise InvalidParameter(
            "Invalid 'stream_options': only allowed when 'stream' is true.", param="stream_options"
        )
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise InvalidParameter(
            "Invalid 'stream_options': expected an object with 'include_usage'.", param="stream_options"
        )
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise InvalidParameter(
            "Invalid 'stream_options.include_usage': expected a boolean.", param="stream_options"
        )
    return bool(include_usage)


# ------------------------------------------------------------------------------------------------ responses


class _ResponsesBody(BaseModel):
    """The members of a Responses request tokenfan maps; anything else was dropped or refused before."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    background: bool | None = None
    stream: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    policy: Literal["enqueue", "reject", "interrupt"] = "enqueue"
    cancel_when_unwatched_seconds: int | None = Field(default=None, ge=1, le=86_400)


@dataclass(frozen=True, slots=True)
class ResponseCall:
    """A checked ``POST /v1/responses``: the generation to accept, how to answer, and what the Response object
    repeats of the request (`echo`, kept with the generation)."""

    request: GenerationRequest
    stream: bool
    background: bool
    echo: dict[str, Any]


#: Where a Responses member went in the chat request, to name it in an error.
_RESPONSES_RENAMES = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning",
    "response_format": "text",
}


def response_call(body: dict[str, Any]) -> ResponseCall:
    """Check a Responses body (a JSON object); raises an `InvalidRequest` naming the problem."""
    body = dict(body)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_obfuscation"}):
        raise UnsupportedParameter("Unsupported parameter: 'stream_options'.", param="stream_options")
    _drop_harmless(body, _RESPONSES_HARMLESS)
    checked = _validated(_ResponsesBody, body)
    request = {
        "model": checked.model,
        "messages": _messages(checked.instructions, checked.input),
        "temperature": checked.temperature,
        "top_p": checked.top_p,
        "max_completion_tokens": checked.max_output_tokens,
        "parallel_tool_calls": checked.parallel_tool_calls,
        "user": checked.user,
        "metadata": checked.metadata,
        "tools": [_chat_tool(i, tool) for i, tool in enumerate(checked.tools)] if checked.tools else None,
        "tool_choice": _chat_tool_choice(checked.tool_choice),
        "reasoning_effort": _reasoning_effort(checked.reasoning),
        "response_format": _response_format(checked.text),
        "policy": checked.policy,
        "cancel_when_unwatched_seconds": checked.cancel_when_unwatched_seconds,
    }
    generation = _validated(
        GenerationRequest, {k: v for k, v in request.items() if v is not None}, _RESPONSES_RENAMES
    )
    return ResponseCall(generation, bool(checked.stream), bool(checked.background), _echo(checked))


def _echo(checked: _ResponsesBody) -> dict[str, Any]:
    """The request members every Response object repeats, with OpenAI's defaults filled in."""
    effort = (checked.reasoning or {}).get("effort")
    return {
        "background": bool(checked.background),
        "instructions": checked.instructions,
        "max_output_tokens": checked.max_output_tokens,
        "max_tool_calls": None,
        "metadata": checked.metadata or {},
        "model": checked.model,
        "parallel_tool_calls": True if checked.parallel_tool_calls is None else checked.parallel_tool_calls,
        "previous_response_id": None,
        "reasoning": {"effort": effort, "summary": None},
        "store": True,
        "temperature": 1.0 if checked.temperature is None else checked.temperature,
        "text": {"format": (checked.text or {}).get("format") or {"type": "text"}},
        "tool_choice": "auto" if checked.tool_choice is None else checked.tool_choice,
        "tools": checked.tools or [],
        "top_p": 1.0 if checked.top_p is None else checked.top_p,
        "truncation": "disabled",
        "user": checked.user,
    }


def _unsupported(param: str, what: str) -> UnsupportedParameter:
    return UnsupportedParameter(f"Unsupported parameter: {what}.", param=param)


def _field(item: dict[str, Any], name: str, param: str, kind: type | tuple[type, ...] = str) -> Any:
    value = item.get(name)
    if not isinstance(value, kind):
        raise InvalidParameter(
            f"Invalid '{param}.{name}': missing, or of the wrong type.", param=f"{param}.{name}"
        )
    return value


_ROLES = ("user", "assistant", "system", "developer")


def _messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for ``instructions`` and ``input``: messages, function calls and their outputs."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for index, item in enumerate(items):
        param, kind = f"input[{index}]", item.get("type", "message")
        if kind == "message":
            role = _field(item, "role", param)
            if role not in _ROLES:
                raise InvalidParameter(
                    f"Invalid '{param}.role': expected one of {', '.join(_ROLES)}.", param=f"{param}.role"
                )
            messages.append({"role": role, "content": _content(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            _attach_call(messages, item, param)
        elif kind == "function_call_output":
            output = _field(item, "output", param, (str, list))
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _field(item, "call_id", param),
                    "content": _content(output, f"{param}.output"),
                }
            )
        elif kind != "reasoning":  # a chat upstream has nowhere to take earlier reasoning: it is left out
            raise _unsupported(f"{param}.type", f"input items of type {kind!r}")
    return messages


def _attach_call(messages: list[dict[str, Any]], item: dict[str, Any], param: str) -> None:
    call = {
        "id": _field(item, "call_id", param),
        "type": "function",
        "function": {"name": _field(item, "name", param), "arguments": _field(item, "arguments", param)},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":  # one assistant turn: its text and its calls
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """Chat content for Responses content: a string stays one; text parts join into one (every chat upstream
    takes a string), images become ``image_url`` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParameter(f"Invalid '{param}': expected a string or a list of parts.", param=param)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": _field(part, "text", where)})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"], **({"detail": part["detail"]} if part.get("detail") else {})}
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _unsupported(f"{where}.type", f"content parts of type {kind!r}")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _chat_tool(index: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise _unsupported(
            f"tools[{index}].type", f"tools of type {tool.get('type')!r}; only 'function' tools"
        )
    param = f"tools[{index}]"
    function = {"name": _field(tool, "name", param)}
    for name in ("description", "parameters", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported("tool_choice", f"tool_choice of type {choice.get('type')!r}")


def _reasoning_effort(reasoning: dict[str, Any] | None) -> str | None:
    if not reasoning:
        return None
    for name in set(reasoning) - {"effort"}:
        if reasoning[name] is not None:
            raise _unsupported(
                f"reasoning.{name}", f"'reasoning.{name}' (a chat upstream gives no summaries)"
            )
    effort = reasoning.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise InvalidParameter("Invalid 'reasoning.effort': expected a string.", param="reasoning.effort")
    return effort


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    if not text:
        return None
    for name in set(text) - {"format"}:
        if text[name] is not None:
            raise _unsupported(f"text.{name}", f"'text.{name}'")
    form = text.get("format")
    if form is not None and not isinstance(form, dict):
        raise InvalidParameter("Invalid 'text.format': expected an object.", param="text.format")
    if form is None or form.get("type") == "text":
        return None
    if form.get("type") == "json_object":
        return {"type": "json_object"}
    if form.get("type") == "json_schema":
        schema = {name: form[name] for name in ("name", "schema", "strict", "description") if name in form}
        return {"type": "json_schema", "json_schema": schema}
    raise _unsupported("text.format.type", f"text formats of type {form.get('type')!r}")
