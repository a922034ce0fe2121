"""One generation's events as OpenAI Responses API streaming events, and as a Response object. Pure: no I/O.

`ResponseEvents` folds the events of one generation, in stream order, into the events the SDK expects
(docs/PROTOCOL.md, "OpenAI Responses"), numbering them 0, 1, 2…:

==========================  ==========================================================================
our event                   Responses events
==========================  ==========================================================================
(before any)                ``response.created`` (status ``queued`` in background mode)
``generation.started``      ``response.in_progress`` (the first attempt's only)
``delta`` reasoning         a ``reasoning`` item (added, ``reasoning_text`` part added) the first time,
                            then ``response.reasoning_text.delta``
``delta`` content           a ``message`` item (added, ``output_text`` part added) the first time, then
                            ``response.output_text.delta``; text after reasoning closes the reasoning
``delta`` tool call         a ``function_call`` item per index (added) the first time, then
                            ``response.function_call_arguments.delta``
``generation.completed``    every open item done (text/arguments done, part done, item done), then
                            ``response.completed`` with usage (``response.incomplete`` when the upstream
                            stopped at ``length`` or ``content_filter``)
``generation.failed``       items done as ``incomplete``, then ``response.failed`` with ``error``
``generation.cancelled``    items done as ``incomplete``, then ``response.cancelled`` (OpenAI's name for
                            it; the SDK has no stream type for it and yields it untyped)
``generation.restarted``    open items done as ``incomplete``; the new attempt's items follow, and the
                            Response's ``output`` holds only them
==========================  ==========================================================================

Why numbering is stable across resumes: the numbers are a function of the generation's events alone, one by
one (never of how a transport batched them), and a resume replays the generation from its first event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenfan.contract.events import FailureType
from tokenfan.contract.offsets import StreamId

__all__ = ["ResponseEvents", "ResponseSse", "response_usage"]

#: Why an upstream that stopped early left the response incomplete, by its finish_reason.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
#: ``error.code`` of a failed response (OpenAI's codes), by the generation's failure type.
_ERROR_CODES: dict[str, str] = {
    FailureType.RATE_LIMITED: "rate_limit_exceeded",
    FailureType.UPSTREAM_REJECTED: "invalid_prompt",
}


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat completion's usage, in the Responses API's names."""
    if usage is None:
        return None
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        # What a chat upstream does not report is 0, as OpenAI reports it for a request that used no cache.
        "input_tokens_details": {
            "cached_tokens": prompt.get("cached_tokens", 0),
            "cache_write_tokens": prompt.get("cache_write_tokens", 0),
        },
        "output_tokens": usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": completion.get("reasoning_tokens", 0)},
        "total_tokens": usage.get("total_tokens", 0),
    }


@dataclass(slots=True)
class _Item:
    """One output item: a reasoning text, an assistant message, or a function call."""

    kind: str  # "reasoning" | "message" | "function_call"
    id: str
    index: int  # its output_index
    text: str = ""  # the reasoning, the message's text, or the call's arguments
    call_id: str = ""
    name: str = ""
    status: str = "in_progress"

    def part(self, text: str) -> dict[str, Any]:
        if self.kind == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    def as_json(self, *, added: bool = False) -> dict[str, Any]:
        if self.kind == "function_call":
            return {
                "id": self.id,
                "type": "function_call",
                "status": self.status,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": self.text,
            }
        content = [] if added else [self.part(self.text)]
        if self.kind == "message":
            return {
                "id": self.id,
                "type": "message",
                "status": self.status,
                "role": "assistant",
                "content": content,
            }
        return {"id": self.id, "type": "reasoning", "status": self.status, "summary": [], "content": content}


class ResponseEvents:
    """The Responses API view of one generation. `opening()` first, then `take` every event of the generation;
    `response()` is the Response object as of the last event taken.

    `echo` holds the request members the Response object repeats (`api.http.openai.bodies.ResponseCall`)."""

    def __init__(self, response_id: str, echo: dict[str, Any], *, created_at: int) -> None:
        self.response_id = response_id
        self.echo = echo
        self.created_at = created_at
        self.status = "queued" if echo.get("background") else "in_progress"
        self.sequence = 0  # the next event's number
        self.items: list[_Item] = []
        self.current = 0  # where the running attempt's items begin in `items`
        self.ended = False
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete_details: dict[str, Any] | None = None
        self.completed_at: int | None = None
        self._started = False
        self._reasoning: _Item | None = None
        self._message: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._ulid = response_id.removeprefix("resp_")

    def response(self) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            **self.echo,
            "output": [item.as_json() for item in self.items[self.current :]],
            "usage": self.usage,
            "completed_at": self.completed_at,
        }

    def opening(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self.response())]

    def take(self, event: dict[str, Any], position: StreamId) -> list[dict[str, Any]]:
        """The Responses events that `event` (stored at `position`) becomes, numbered in order."""
        if self.ended:
            return []
        out: list[dict[str, Any]] = []
        kind = event.get("type")
        if kind == "delta":
            self._delta(event, out)
        elif kind == "generation.started" and not self._started:
            self._started = True
            self.status = "in_progress"
            out.append(self._event("response.in_progress", response=self.response()))
        elif kind == "generation.restarted":
            self._close_all("incomplete", out)
            self.current = len(self.items)
        elif kind in ("generation.completed", "generation.failed", "generation.cancelled"):
            self._end(event, position, out)
        return out

    def _delta(self, event: dict[str, Any], out: list[dict[str, Any]]) -> None:
        reasoning, content = event.get("reasoning"), event.get("content")
        if isinstance(reasoning, str) and reasoning:
            if self._message is not None:
                self._close(self._message, "completed", out)
            self._text(self._reasoning or self._open_text("reasoning", out), reasoning, out)
        if isinstance(content, str) and content:
            if self._reasoning is not None:
                self._close(self._reasoning, "completed", out)
            self._text(self._message or self._open_text("message", out), content, out)
        for call in event.get("tool_calls") or ():
            if isinstance(call, dict):
                self._call(call, out)

    def _open_text(self, kind: str, out: list[dict[str, Any]]) -> _Item:
        item = self._add(kind, "msg" if kind == "message" else "rs", out)
        out.append(
            self._event(
                "response.content_part.added",
                item_id=item.id,
                output_index=item.index,
                content_index=0,
                part=item.part(""),
            )
        )
        if kind == "message":
            self._message = item
        else:
            self._reasoning = item
        return item

    def _add(self, kind: str, prefix: str, out: list[dict[str, Any]], **fields: str) -> _Item:
        item = _Item(kind, f"{prefix}_{self._ulid}_{len(self.items)}", len(self.items), **fields)
        self.items.append(item)
        out.append(
            self._event("response.output_item.added", output_index=item.index, item=item.as_json(added=True))
        )
        return item

    def _text(self, item: _Item, delta: str, out: list[dict[str, Any]]) -> None:
        item.text += delta
        kind = "response.output_text.delta" if item.kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if item.kind == "message" else {}
        out.append(
            self._event(kind, item_id=item.id, output_index=item.index, content_index=0, delta=delta, **extra)
        )

    def _call(self, call: dict[str, Any], out: list[dict[str, Any]]) -> None:
        index = int(call.get("index", 0))
        item = self._calls.get(index)
        if item is None:
            call_id = call.get("id") or f"call_{self._ulid}_{index}"
            item = self._calls[index] = self._add(
                "function_call", "fc", out, call_id=str(call_id), name=str(call.get("name") or "")
            )
        elif call.get("name") and not item.name:
            item.name = str(call["name"])
        arguments = str(call.get("arguments") or "")
        if arguments:
            item.text += arguments
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=item.index,
                    delta=arguments,
                )
            )

    def _close(self, item: _Item, status: str, out: list[dict[str, Any]]) -> None:
        item.status = status
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            out.append(
                self._event(
                    "response.function_call_arguments.done", **where, name=item.name, arguments=item.text
                )
            )
        else:
            if item.kind == "message":
                out.append(
                    self._event(
                        "response.output_text.done", **where, content_index=0, text=item.text, logprobs=[]
                    )
                )
            else:
                out.append(
                    self._event("response.reasoning_text.done", **where, content_index=0, text=item.text)
                )
            out.append(
                self._event("response.content_part.done", **where, content_index=0, part=item.part(item.text))
            )
        out.append(self._event("response.output_item.done", output_index=item.index, item=item.as_json()))
        if item is self._message:
            self._message = None
        elif item is self._reasoning:
            self._reasoning = None
        else:
            self._calls = {index: call for index, call in self._calls.items() if call is not item}

    def _close_all(self, status: str, out: list[dict[str, Any]]) -> None:
        for item in [item for item in self.items[self.current :] if item.status == "in_progress"]:
            self._close(item, status, out)

    def _end(self, event: dict[str, Any], position: StreamId, out: list[dict[str, Any]]) -> None:
        kind = event["type"]
        reason = _INCOMPLETE.get(str(event.get("finish_reason"))) if kind == "generation.completed" else None
        self._close_all(
            "completed" if kind == "generation.completed" and reason is None else "incomplete", out
        )
        self.ended = True
        self.usage = response_usage(event.get("usage"))
        self.completed_at = position.ms // 1000
        if kind == "generation.completed":
            self.status = "incomplete" if reason else "completed"
            self.incomplete_details = {"reason": reason} if reason else None
        elif kind == "generation.failed":
            self.status = "failed"
            error = event.get("error")
            error = error if isinstance(error, dict) else {}
            failure = str(error.get("type", FailureType.INTERNAL))
            self.error = {
                "code": _ERROR_CODES.get(failure, "server_error"),
                "message": str(error.get("message", "the generation failed")),
                "type": failure,
            }
        else:
            self.status = "cancelled"
        out.append(self._event(f"response.{self.status}", response=self.response()))

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event


class ResponseSse:
    """`ResponseEvents` as Server-Sent Events (``event: <type>`` / ``data: <json>``), from the event after
    `starting_after` on; `emit` False only folds (a request that answers one Response object)."""

    def __init__(self, events: ResponseEvents, *, starting_after: int = -1, emit: bool = True) -> None:
        self.events = events
        self.starting_after = starting_after
        self.emit = emit

    @property
    def ended(self) -> bool:
        return self.events.ended

    @property
    def last_sequence(self) -> int:
        """The number of the last event made so far."""
        return self.events.sequence - 1

    def opening(self) -> bytes:
        return self._encode(self.events.opening())

    def take(self, event: dict[str, Any], position: StreamId, offset: str) -> bytes:
        return self._encode(self.events.take(event, position))

    def _encode(self, events: list[dict[str, Any]]) -> bytes:
        if not self.emit:
            return b""
        return b"".join(
            b"event: "
            + event["type"].encode()
            + b"\ndata: "
            + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n\n"
            for event in events
            if event["sequence_number"] > self.starting_after
        )
