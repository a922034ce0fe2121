"""Request and response bodies of the HTTP API (they also make its OpenAPI schema).

The schema states what validation does: requests are validated strictly (a number is not taken for a
boolean, nor a string for a number), and ids and offsets carry their grammars, in requests and responses
alike, so that a client generated from the schema sends what the API takes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import GENERATION_ID_PATTERN, SESSION_ID_PATTERN
from tokenfan.contract.offsets import OFFSET_PATTERN

__all__ = [
    "CancelResult",
    "ChatMessage",
    "ErrorBody",
    "ErrorResponse",
    "GenerationAccepted",
    "GenerationLinks",
    "GenerationRequest",
    "GenerationView",
    "SessionView",
    "TokenGrant",
    "lone_surrogate_at",
]


def _integral(value: Any) -> Any:
    """JSON has numbers, not ints and floats: 3.0 is the integer 3 (JSON Schema says so too), while true,
    "3" and 3.5 are not integers and stay for strict validation to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Marks an integer member, after its constraints (pydantic then still states them in the JSON schema):
#: strict, but a JSON number with no fraction is an integer.
Integral = BeforeValidator(_integral)


class ChatMessage(BaseModel):
    """One OpenAI chat message. Provider-specific members (e.g. ``reasoning_content``) pass through."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_call_id: str | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None


class GenerationRequest(BaseModel):
    """``POST /v1/sessions/{session_id}/generations``: an OpenAI chat.completions request, always streamed.

    Its members are tokenfan's own and those `tokenfan.contract.parameters` passes to the upstream, no
    other (a test keeps the three in step with docs/PROTOCOL.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000), Integral] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_000_000), Integral] | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: Annotated[int, Integral] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = Field(default=None, max_length=32)
    top_k: Annotated[int, Field(ge=-1), Integral] | None = Field(
        default=None, description="Sample from the k likeliest tokens (-1: all); open-weight servers."
    )
    min_p: float | None = Field(
        default=None, ge=0, le=1, description="Drop tokens below this share of the likeliest's probability."
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, description="Penalty for repeated tokens (1: none); open-weight servers."
    )
    n: Annotated[int, Field(ge=1, le=1), Integral] | None = Field(
        default=None, description="Only 1 is supported: one generation, one stream."
    )
    policy: Literal["enqueue", "reject", "interrupt"] = Field(
        default="enqueue",
        description="When the session is busy: `enqueue` runs this after the generations ahead of it; "
        "`reject` answers 409 instead; `interrupt` cancels the running one and runs this right after it.",
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Yours: stored with the generation and echoed in `generation.started`."
    )
    cancel_when_unwatched_seconds: Annotated[int, Field(ge=1, le=86_400), Integral] | None = Field(
        default=None,
        description="Cancel the generation once nobody has watched its session for this long (off by default).",
    )

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """JSON may escape a lone UTF-16 surrogate ("\\ud800"); the text it decodes to is not Unicode that
        any UTF-8 encoder takes (Redis's client, the upstream's), so it is refused here, naming where."""
        where = lone_surrogate_at(data)
        if where is not None:
            raise ValueError(
                f"text at {'/'.join(where) or 'the top'} holds a lone surrogate: not valid Unicode"
            )
        return data


def lone_surrogate_at(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Where in `value` (decoded JSON) a string, or a key, holds a lone surrogate; None when nowhere."""
    if isinstance(value, str):
        return None if value.isascii() or not _has_surrogate(value) else path
    if isinstance(value, list):
        items: Any = ((str(index), item) for index, item in enumerate(value))
    elif isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and _has_surrogate(key):
                return (*path, key.encode("utf-8", "replace").decode())
        items = ((str(key), item) for key, item in value.items())
    else:
        return None
    for name, item in items:
        found = lone_surrogate_at(item, (*path, name))
        if found is not None:
            return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


#: Ids and offsets in responses, with their grammars (docs/PROTOCOL.md, Identifiers).
GenerationIdText = Annotated[str, Field(pattern=GENERATION_ID_PATTERN)]
SessionIdText = Annotated[str, Field(pattern=SESSION_ID_PATTERN, max_length=128)]
OffsetText = Annotated[str, Field(pattern=OFFSET_PATTERN)]


class CancelResult(BaseModel):
    generation_id: GenerationIdText
    status: str = Field(
        description="`cancelled` (done now), `cancelling` (running: its worker stops it and appends "
        "`generation.cancelled`), or the status it had already finished with (`completed`, `failed`, `cancelled`)."
    )
    cancelled: bool = Field(
        description="true when this request cancelled it (now, or as soon as its worker notices); false when "
        "it had already finished (a no-op)."
    )


class GenerationLinks(BaseModel):
    self: str
    session: str
    events: str = Field(description="SSE endpoint of the session (this API).")
    stream: str | None = Field(default=None, description="WebSocket URL of the relay, when configured.")


class GenerationAccepted(BaseModel):
    generation_id: GenerationIdText
    session_id: SessionIdText
    status: GenerationStatus
    queue_position: int = Field(description="1 when it runs now; n when n-1 generations are ahead of it.")
    links: GenerationLinks
    token: str | None = Field(
        default=None, description="A short-lived token to watch this session (hand it to the browser)."
    )
    token_expires_at: int | None = Field(default=None, description="When `token` expires (unix seconds).")


class TokenGrant(BaseModel):
    session_id: SessionIdText
    token: str = Field(
        description="Lets its holder watch this session (relay, SSE, snapshots) until it expires."
    )
    expires_at: int = Field(description="Unix seconds.")


class GenerationView(BaseModel):
    """Everything known about one generation now: a snapshot to rebuild from instead of replaying."""

    generation_id: GenerationIdText
    session_id: SessionIdText
    status: GenerationStatus
    text: str
    reasoning: str = Field(description="Reasoning the upstream streamed (DeepSeek/Qwen `reasoning_content`).")
    tool_calls: list[dict[str, Any]] = Field(description="Tool calls so far: index, id, name, arguments.")
    model: str | None
    attempt: int
    seq: int = Field(description="seq of this generation's newest event (0 before the first).")
    finish_reason: str | None
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at_ms: int | None
    started_at_ms: int | None
    finished_at_ms: int | None
    first_offset: OffsetText | None
    last_offset: OffsetText | None = Field(description="Offset of this generation's newest event.")


class SessionView(BaseModel):
    session_id: SessionIdText
    offset: OffsetText | None = Field(
        description="Everything below is as of this offset; resume with `after=` it."
    )
    generations: list[GenerationView]


class ErrorBody(BaseModel):
    code: str
    message: str
    status: int
    type: str = Field(
        description="`invalid_request_error`, `requests` (429) or `server_error`, as OpenAI names them."
    )
    param: str | None = Field(description="The request member at fault, when one is.")
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
