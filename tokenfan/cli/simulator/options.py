"""What a simulated reply depends on: the server's config, the request body and its ``<<sim ...>>`` directive.

Pure: no I/O. Every malformed input raises ValueError with a message fit for a 400 response.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Directive", "SimToolCall", "SimulatorConfig", "message_text", "parse_directive", "validate_body"]


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulator behaves when a request carries no directive saying otherwise."""

    tokens_per_second: float = 50.0  # 0 means as fast as possible
    reply_tokens: int = 48
    api_key: str | None = None  # when set, requests must carry "Authorization: Bearer <key>"
    model: str = "tokenfan-sim"
    #: When set, a request for any other model is refused with 404 ``model_not_found``, as OpenAI refuses
    #: one; None answers every model.
    models: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SimToolCall:
    """One tool call the simulated model makes."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True)
class Directive:
    """The parsed ``<<sim {...}>>`` options of one request; the defaults mean "no directive"."""

    text: str = ""  # the directive verbatim: the default fault key
    tokens: int | None = None
    rate: float | None = None
    chunks: tuple[str, ...] | None = None
    reasoning: tuple[str, ...] = ()
    tool_calls: tuple[SimToolCall, ...] = ()
    parallel: bool = False
    tool_chunk: int = 7
    status: int | None = None
    times: int | None = None
    key: str | None = None
    retry_after: float | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    error_after: int | None = None
    usage: Literal["final", "none", "every"] | None = None
    empty_deltas: bool = False
    extra_fields: bool = False
    finish_reason: str | None = None
    cumulative: bool = False
    tool_index: bool = True

    @property
    def fault_key(self) -> str:
        """Requests sharing this key share one `times` budget."""
        return self.text if self.key is None else self.key

    def without_faults(self) -> Directive:
        """This directive once its `times` budget is spent: the same reply, delivered without failing."""
        return dataclasses.replace(self, status=None, drop_after=None, stall_after=None, error_after=None)


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        valid = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        if not valid or (maximum is not None and value > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{name!r} must be an integer {bounds}")
        return int(value)

    return parse


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{name!r} must be a finite non-negative number")
    return float(value)


def _of_type(kind: type[Any], description: str) -> Callable[[str, Any], Any]:
    def parse(name: str, value: Any) -> Any:
        if not isinstance(value, kind):
            raise ValueError(f"{name!r} must be {description}")
        return value

    return parse


def _texts(name: str, value: Any) -> tuple[str, ...]:
    """Pieces of text. They may hold lone surrogates (a piece ending within a surrogate pair, or a lone
    one): those are sent as JSON escapes (``"\\ud83d"``), valid JSON that some providers send."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name!r} must be a list of strings")
    return tuple(value)


def _usage(name: str, value: Any) -> str:
    if value not in ("final", "none", "every"):
        raise ValueError(f"{name!r} must be one of 'final', 'none', 'every'")
    return str(value)


def _tool_call(item: Any) -> SimToolCall:
    fields_ok = isinstance(item, dict) and not set(item) - {"name", "arguments", "id"}
    if not fields_ok or not isinstance(item.get("name"), str) or not isinstance(item.get("arguments"), str):
        raise ValueError("each tool call must be {'name': str, 'arguments': str, 'id'?: str}")
    if not isinstance(item.get("id"), str | None):
        raise ValueError("a tool call 'id' must be a string")
    return SimToolCall(item["name"], item["arguments"], item.get("id"))


def _tool_calls(name: str, value: Any) -> tuple[SimToolCall, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{name!r} must be a list")
    return tuple(_tool_call(item) for item in value)


_OPTIONS: dict[str, Callable[[str, Any], Any]] = {
    "tokens": _integer(0),
    "rate": _number,
    "chunks": _texts,
    "reasoning": _texts,
    "tool_calls": _tool_calls,
    "parallel": _of_type(bool, "true or false"),
    "tool_chunk": _integer(1),
    "status": _integer(400, 599),
    "times": _integer(0),
    "key": _of_type(str, "a string"),
    "retry_after": _number,
    "drop_after": _integer(0),
    "stall_after": _integer(0),
    "error_after": _integer(0),
    "usage": _usage,
    "empty_deltas": _of_type(bool, "true or false"),
    "extra_fields": _of_type(bool, "true or false"),
    "finish_reason": _of_type(str, "a string"),
    "cumulative": _of_type(bool, "true or false"),
    "tool_index": _of_type(bool, "true or false"),
}


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one chat message, whether its content is a string or a list of content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def parse_directive(body: Mapping[str, Any]) -> Directive:
    """The directive in the last user message of a request body; raises ValueError when it is malformed."""
    users = [m for m in body.get("messages", ()) if isinstance(m, dict) and m.get("role") == "user"]
    text = message_text(users[-1]) if users else ""
    start = text.find("<<sim")
    if start < 0:
        return Directive()
    try:
        # raw_decode, not a regex: the JSON may itself contain ">>" (e.g. in `chunks`).
        options, end = json.JSONDecoder().raw_decode(text, text.index("{", start))
    except ValueError as exc:  # no "{" at all, or invalid JSON
        raise ValueError(f"<<sim ...>> directive is not valid JSON: {exc}") from None
    if not isinstance(options, dict) or not text[end:].lstrip().startswith(">>"):
        raise ValueError("<<sim ...>> directive must be a JSON object followed by '>>'")
    if unknown := sorted(set(options) - set(_OPTIONS)):
        raise ValueError(f"unknown sim option(s): {', '.join(unknown)}")
    try:
        parsed = {name: _OPTIONS[name](name, value) for name, value in options.items()}
    except ValueError as exc:
        raise ValueError(f"<<sim ...>> directive: {exc}") from None
    if parsed.get("tool_index") is False and parsed.get("parallel"):
        # Interleaved deltas without an index, most without an id, would name no call at all.
        raise ValueError("<<sim ...>> directive: 'tool_index': false streams calls one after the other")
    return Directive(text=text[start : text.index(">>", end) + 2], **parsed)


def validate_body(body: Any) -> dict[str, Any]:
    """The body if it is a chat.completions request the simulator can answer; raises ValueError otherwise."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise ValueError("'model' must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ValueError("each message must be an object with a string 'role'")
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            _integer(1)(name, body[name])
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ValueError("'stream_options' must be an object")
    return body
