"""The OpenAI-compatible front door as an app sees it: the official ``openai`` clients pointed at our API, and
what the upstream (the simulator) produces for a request, to compare with what they assemble."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.support.requests import SIMULATOR
from tokenfan.cli.simulator import parse_directive
from tokenfan.cli.simulator.reply import Reply, completion, plan_reply


def sync_client(api_url: str, key: str) -> openai.OpenAI:
    """The three lines an existing app changes: our base URL, our API key; no retries, so that a test sees
    every answer as it came."""
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=30)


def async_client(api_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=30)


def prompt(text: str, directive: dict[str, Any] | None = None) -> list[ChatCompletionMessageParam]:
    """One user message, shaped by a ``<<sim>>`` directive."""
    if directive is not None:
        text = f"{text} <<sim {json.dumps(directive)}>>"
    return [cast(ChatCompletionMessageParam, {"role": "user", "content": text})]


Messages = Sequence[ChatCompletionMessageParam] | Sequence[dict[str, Any]]


def upstream_reply(messages: Messages, **members: Any) -> Reply:
    """What the simulator answers to a chat request of `messages` (and sampling `members`)."""
    body = {"model": SIMULATOR.model, "messages": list(messages), **members}
    return plan_reply(body, parse_directive(body), SIMULATOR)


def upstream_completion(messages: Messages, **members: Any) -> dict[str, Any]:
    """The ``chat.completion`` the simulator would answer (what a client of the upstream itself assembles)."""
    reply = upstream_reply(messages, **members)
    return completion(reply, model=SIMULATOR.model, created=0)


def upstream_usage(messages: Messages, **members: Any) -> dict[str, int]:
    reply = upstream_reply(messages, **members)
    return reply.usage(len(reply.reasoning) + len(reply.content))


def sse_events(lines: list[str]) -> list[dict[str, str]]:
    """SSE events (``id``, ``event``, ``data``) from the lines of a response, as the specification reads them."""
    events: list[dict[str, str]] = []
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in event:
                events.append(event)
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = event[name] + "\n" + value if name == "data" and name in event else value
    return events
