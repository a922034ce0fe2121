"""One generation's events as OpenAI ``chat.completion.chunk`` Server-Sent Events, or as one ``chat.completion``.
Pure: no I/O.

`ChatStream` folds the events of one generation, in stream order, and returns for each the SSE bytes it
becomes (docs/PROTOCOL.md, "OpenAI chat completions"):

==========================  ==========================================================================
our event                   chunks
==========================  ==========================================================================
``generation.started``      ``delta: {"role": "assistant", "content": ""}`` (the first attempt's only)
``delta``                   one chunk: ``reasoning_content``, ``content``, ``tool_calls`` (index, and id,
                            ``type: "function"`` and name where the upstream gave them; arguments)
``generation.completed``    ``delta: {}`` with ``finish_reason``; the usage chunk (``choices: []``) when
                            ``stream_options.include_usage``; ``data: [DONE]``
``generation.failed``       ``data: {"error": {...}}`` (the SDK raises it as ``APIError``); no ``[DONE]``
``generation.cancelled``    likewise, code ``generation_cancelled``
``generation.restarted``    nothing before any output; after output likewise, ``generation_restarted``
``x.*``                     nothing
==========================  ==========================================================================

Each event's SSE block carries ``id: <offset>`` on its last line group, so a client that resumes after that
id (``Last-Event-ID``) gets exactly what follows: a resume replays the generation from its first event
(`resume_after` suppresses what the client already has), which keeps every chunk what it was the first time.
"""

from __future__ import annotations

import json
from typing import Any

from api.http.openai.failures import RESTARTED, Failure, failure_of
from tokenfan.contract.offsets import StreamId

__all__ = ["DONE", "ChatStream", "sse_block"]

DONE = b"[DONE]"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def sse_block(payloads: list[bytes], event_id: str | None = None) -> bytes:
    """SSE events, one per payload (``data:`` lines never hold a raw newline: compact JSON has none); the
    last carries `event_id`, so a client resuming after it has every event of the block."""
    blocks = [b"data: " + payload + b"\n\n" for payload in payloads]
    if event_id is not None and blocks:
        blocks[-1] = b"id: " + event_id.encode() + b"\n" + blocks[-1]
    return b"".join(blocks)


class ChatStream:
    """The chat completion of one generation, built from its events. Feed every event of the generation with
    `take`; `completion()` is the whole ``chat.completion`` once `ended`.

    `emit` False folds without making chunks (a ``stream: false`` request). `resume_after` suppresses the
    chunks of events at or before that stream position, which the client already has."""

    def __init__(
        self,
        *,
        completion_id: str,
        model: str,
        created: int,
        include_usage: bool,
        emit: bool = True,
        resume_after: StreamId | None = None,
    ) -> None:
        self.head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self._prefix = _dumps(self.head)[:-1] + b',"choices":[{"index":0,"delta":'
        self._suffix = b"}" if not include_usage else b',"usage":null}'  # OpenAI's, once usage is asked for
        self.include_usage = include_usage
        self.emit = emit
        self.resume_after = resume_after
        self.started = False  # the role chunk went out (the first attempt's; a restart does not repeat it)
        self.has_output = False  # this attempt produced content, reasoning or a tool call
        self.ended = False
        self.failure: Failure | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}

    def take(self, event: dict[str, Any], position: StreamId, offset: str) -> bytes:
        """The SSE bytes `event` (at `position`, offset `offset`) becomes; b"" for none."""
        if self.ended:
            return b""
        payloads = self._payloads(event)
        if not payloads or not self.emit or (self.resume_after is not None and position <= self.resume_after):
            return b""
        return sse_block(payloads, offset)

    def _payloads(self, event: dict[str, Any]) -> list[bytes]:
        kind = event.get("type")
        if kind == "delta":
            return self._delta(event)
        if kind == "generation.started":
            if self.started:
                return []
            self.started = True
            return [self._chunk(b'{"role":"assistant","content":""}')]
        if kind == "generation.completed":
            return self._completed(event)
        if kind in ("generation.failed", "generation.cancelled"):
            return self._fail(failure_of(event))
        if kind == "generation.restarted":
            if self.has_output and self.emit:
                return self._fail(RESTARTED)
            self._discard_output()
        return []

    def _delta(self, event: dict[str, Any]) -> list[bytes]:
        delta: dict[str, Any] = {}
        reasoning, content = event.get("reasoning"), event.get("content")
        if isinstance(reasoning, str) and reasoning:
            delta["reasoning_content"] = reasoning
            self._reasoning.append(reasoning)
        if isinstance(content, str) and content:
            delta["content"] = content
            self._content.append(content)
        calls = [self._tool_call(call) for call in event.get("tool_calls") or () if isinstance(call, dict)]
        if calls:
            delta["tool_calls"] = calls
        if not delta:
            return []
        self.has_output = True
        return [self._chunk(_dumps(delta))]

    def _tool_call(self, call: dict[str, Any]) -> dict[str, Any]:
        index, call_id, name = int(call.get("index", 0)), call.get("id"), call.get("name")
        arguments = str(call.get("arguments", ""))
        held = self._calls.setdefault(index, {"id": None, "name": None, "arguments": ""})
        held["arguments"] += arguments
        chunk: dict[str, Any] = {"index": index}
        if call_id is not None:
            held["id"] = chunk["id"] = call_id
            chunk["type"] = "function"
        function: dict[str, Any] = {}
        if name is not None:
            held["name"] = function["name"] = name
        function["arguments"] = arguments
        chunk["function"] = function
        return chunk

    def _completed(self, event: dict[str, Any]) -> list[bytes]:
        self.ended = True
        self.finish_reason = str(event.get("finish_reason") or "stop")
        self.usage = event.get("usage")
        payloads = [self._chunk(b"{}", self.finish_reason)]
        if self.include_usage:
            usage = _dumps(self.usage) if self.usage is not None else b"null"
            payloads.append(_dumps(self.head)[:-1] + b',"choices":[],"usage":' + usage + b"}")
        payloads.append(DONE)
        return payloads

    def _fail(self, failure: Failure) -> list[bytes]:
        self.ended = True
        self.failure = failure
        return [_dumps({"error": failure.error()})]

    def _discard_output(self) -> None:
        self.has_output = False
        self._content.clear()
        self._reasoning.clear()
        self._calls.clear()

    def _chunk(self, delta: bytes, finish_reason: str | None = None) -> bytes:
        finish = b"null" if finish_reason is None else _dumps(finish_reason)
        return self._prefix + delta + b',"logprobs":null,"finish_reason":' + finish + b"}]" + self._suffix

    def completion(self) -> dict[str, Any]:
        """The ``chat.completion`` of what was folded (a ``stream: false`` answer)."""
        text = "".join(self._content)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._calls:
            message["content"] = text or None
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for _, call in sorted(self._calls.items())
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": self.usage}
