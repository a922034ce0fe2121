"""The reply to one request and the exact sequence of SSE events that stream it.

Pure: no I/O, no clock, no global RNG. The words are seeded by a hash of the request's model and messages,
so the same request always gets the same reply and a test can predict it with `reply_chunks`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Literal

from tokenfan.cli.simulator.options import (
    Directive,
    SimToolCall,
    SimulatorConfig,
    message_text,
    parse_directive,
)

__all__ = ["Event", "Halt", "Reply", "Step", "completion", "plan_reply", "reply_chunks", "stream_steps"]

_WORDS = """
    able about above across after again air almost along also always animal answer apple area around ask
    autumn away back ball before begin behind best better between bird black blue boat body book both bread
    bright bring brother build call calm carry cause center change child city clean clear close cloud cold
    color come common count country cover cross dance dark day deep door down draw dream drive early earth
    east easy eight end enough even every eye face fall family far farm fast field fine fire first fish
    five floor flower follow food forest four free fresh friend full game garden gentle give glass go gold
    good great green ground grow half hand happy hard hear heart heavy help high hill hold home hope horse
    house idea island kind lake land large late laugh learn light line listen little long morning mountain
    music near night north open paper path quiet rain river road round same sea simple small snow song
"""
_VOCABULARY = tuple(_WORDS.split())
_FAULTS = ("drop_after", "stall_after", "error_after")
UsageMode = Literal["off", "final", "none", "every"]


@dataclass(frozen=True)
class Reply:
    """Everything the simulated model says in answer to one request."""

    digest: bytes  # identifies the request: seeds the words, names the completion
    reasoning: tuple[str, ...]
    content: tuple[str, ...]
    tool_calls: tuple[SimToolCall, ...]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_id(self) -> str:
        return "chatcmpl-" + self.digest.hex()[:24]

    def tool_call_id(self, index: int) -> str:
        return self.tool_calls[index].id or f"call_{self.digest.hex()[24:40]}{index}"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        total = self.prompt_tokens + completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total,
        }


def _words(seed: bytes, count: int) -> tuple[str, ...]:
    rng = random.Random(int.from_bytes(seed[:8], "big"))
    words = [rng.choice(_VOCABULARY) for _ in range(count)]
    if not words:
        return ()
    words[-1] += "."
    return (words[0], *(" " + word for word in words[1:]))


def plan_reply(body: Mapping[str, Any], directive: Directive, config: SimulatorConfig) -> Reply:
    """The reply to a validated request body."""
    canonical = json.dumps(
        {"model": body["model"], "messages": body["messages"]},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(
        canonical.encode(errors="surrogatepass")
    ).digest()  # JSON may carry lone surrogates
    content = directive.chunks
    if content is None:
        content = _words(digest, config.reply_tokens if directive.tokens is None else directive.tokens)
    reasoning, tool_calls, finish = directive.reasoning, directive.tool_calls, "stop"
    if tool_calls:
        finish = "tool_calls"
    # As with OpenAI the budget covers reasoning too, and a capped reply never gets to its tool calls.
    cap: int | None = body.get("max_completion_tokens") or body.get("max_tokens")
    if cap is not None and len(reasoning) + len(content) > cap:
        reasoning = reasoning[:cap]
        content, tool_calls, finish = content[: cap - len(reasoning)], (), "length"
    prompt_tokens = sum(len(message_text(m).split()) for m in body["messages"])
    return Reply(digest, reasoning, content, tool_calls, directive.finish_reason or finish, prompt_tokens)


def reply_chunks(body: dict[str, Any], config: SimulatorConfig) -> list[str]:
    """The content pieces, one per token, that a fault-free request with this body streams.

    With ``drop_after``/``stall_after``/``error_after`` = N the stream carries the first N of them.
    """
    return list(plan_reply(body, parse_directive(body), config).content)


def completion(reply: Reply, *, model: str, created: int) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.content), "refusal": None}
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    if reply.tool_calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [
            {
                "id": reply.tool_call_id(i),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for i, c in enumerate(reply.tool_calls)
        ]
    return {
        "id": reply.completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}],
        "usage": reply.usage(len(reply.reasoning) + len(reply.content)),
    }


@dataclass(frozen=True)
class Event:
    """One SSE ``data:`` line; ``data=None`` is the ``[DONE]`` sentinel."""

    data: dict[str, Any] | None
    paced: bool = False  # a token: it waits for its slot in the rate schedule


@dataclass(frozen=True)
class Halt:
    """Stop sending: ``drop`` cuts the connection mid-body, ``stall`` waits for the client to leave."""

    kind: Literal["drop", "stall"]


Step = Event | Halt


class _Chunks:
    """Builds the chunk objects of one stream, counting tokens for the running usage of ``usage: every``."""

    def __init__(self, reply: Reply, *, model: str, created: int, usage: UsageMode, extra: bool) -> None:
        self.reply, self.usage_mode, self.extra, self.tokens = reply, usage, extra, 0
        self.head = {
            "id": reply.completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }

    def _finish(self, chunk: dict[str, Any], paced: bool = False) -> Event:
        if self.usage_mode == "every":
            chunk["usage"] = self.reply.usage(self.tokens)
        elif self.usage_mode == "final":
            chunk.setdefault("usage", None)  # what OpenAI puts on every other chunk once usage is asked for
        if self.extra:
            chunk.update(
                system_fingerprint="fp_tokenfan_sim", x_provider={"name": "tokenfan-sim", "shard": 7}
            )
        return Event(chunk, paced)

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None, *, paced: bool = False) -> Event:
        if self.extra:
            delta = {**delta, "obfuscation": "qZ3x"}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return self._finish({**self.head, "choices": [choice]}, paced)

    def token(self, delta: dict[str, Any]) -> Event:
        """A reasoning or content piece: paced, and counted in usage."""
        self.tokens += 1
        return self.delta(delta, paced=True)

    def usage(self) -> Event:
        return self._finish({**self.head, "choices": [], "usage": self.reply.usage(self.tokens)})


def _tool_call_deltas(reply: Reply, directive: Directive) -> Iterator[dict[str, Any]]:
    scripts: list[list[dict[str, Any]]] = []
    for i, call in enumerate(reply.tool_calls):
        header = {"index": i, "id": reply.tool_call_id(i), "type": "function"}
        script = [{**header, "function": {"name": call.name, "arguments": ""}}]
        size = directive.tool_chunk
        pieces = [call.arguments[at : at + size] for at in range(0, len(call.arguments), size)]
        scripts.append(script + [{"index": i, "function": {"arguments": piece}} for piece in pieces])
    # OpenAI streams one call after the other; some providers interleave parallel calls.
    rounds = zip_longest(*scripts) if directive.parallel else scripts
    for tool_delta in (d for rnd in rounds for d in rnd if d is not None):
        if not directive.tool_index:  # some providers number nothing: the id names each new call
            tool_delta = {key: value for key, value in tool_delta.items() if key != "index"}
        yield {"tool_calls": [tool_delta]}


def _as_sent(pieces: tuple[str, ...], directive: Directive) -> Iterator[str]:
    """A channel's pieces as the stream carries them: each one, or (``cumulative``) all of them so far."""
    so_far = ""
    for piece in pieces:
        so_far += piece
        yield so_far if directive.cumulative else piece


def _fault(directive: Directive) -> tuple[int, Step] | None:
    """The first armed fault: after how many content pieces it strikes, and how."""
    armed = sorted(
        (getattr(directive, name), name) for name in _FAULTS if getattr(directive, name) is not None
    )
    if not armed:
        return None
    after, name = armed[0]
    if name == "error_after":
        return after, Event({"error": {"message": "simulated mid-stream error", "type": "server_error"}})
    return after, Halt("drop" if name == "drop_after" else "stall")


def stream_steps(
    reply: Reply, directive: Directive, *, model: str, created: int, include_usage: bool
) -> Iterator[Step]:
    """Every event of the stream in order, ending in ``[DONE]`` unless a fault cuts it short."""
    usage: UsageMode = directive.usage or ("final" if include_usage else "off")
    chunks = _Chunks(reply, model=model, created=created, usage=usage, extra=directive.extra_fields)
    yield chunks.delta({"role": "assistant", "content": ""})
    for piece in _as_sent(reply.reasoning, directive):
        yield chunks.token({"reasoning_content": piece})
    fault = _fault(directive)
    cut = len(reply.content) if fault is None else fault[0]
    for index, piece in enumerate(_as_sent(reply.content[:cut], directive)):
        if directive.empty_deltas and index:
            yield chunks.delta({})
            yield chunks.delta({"content": ""})
        yield chunks.token({"content": piece})
    if fault is not None:  # a threshold past the end of the content strikes right after it
        yield fault[1]
        return
    for tool_delta in _tool_call_deltas(reply, directive):
        yield chunks.delta(tool_delta, paced=True)  # generated like tokens, though usage counts only text
    last: dict[str, Any] = {}
    if directive.cumulative and reply.content:
        last["content"] = "".join(reply.content)  # DashScope's last chunk repeats the whole text
    yield chunks.delta(last, reply.finish_reason)
    if usage in ("final", "every"):
        yield chunks.usage()
    yield Event(None)
