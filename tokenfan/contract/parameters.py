"""What a generation request may ask of the upstream: one rule, read by the API's schema, the worker and the
protocol's documentation alike. Pure: no I/O.

**The rule.** A parameter passes to the upstream as it is when tokenfan can carry what it changes: it
shapes the text, reasoning and tool calls the events hold (sampling, limits, tools, formats). The
OpenAI ones are listed, and the sampling extensions that open-weight servers (vLLM, SGLang, llama.cpp,
DashScope, TGI) understand under the same names. A parameter asking for something the events have no
place for is refused with a 422 that says why (`NOT_CARRIED`), and so is any member the schema does not
know, so that a typo never silently changes a request.
"""

from __future__ import annotations

from typing import Final

__all__ = ["NOT_CARRIED", "PASSED_THROUGH", "TOKENFAN_MEMBERS"]

#: Members passed to the upstream unchanged (the API's schema states each one's type and range).
PASSED_THROUGH: Final = frozenset(
    {
        # OpenAI chat.completions
        "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
        "frequency_penalty", "seed", "logit_bias", "user", "tools", "tool_choice", "parallel_tool_calls",
        "response_format", "reasoning_effort",
        # sampling extensions of open-weight servers, under the names they share
        "top_k", "min_p", "repetition_penalty",
    }
)  # fmt: skip

#: Members that are tokenfan's own, or that it sets itself: the model and messages go to the upstream as
#: the request's core, `n` may only be 1, and the rest never leave tokenfan.
TOKENFAN_MEMBERS: Final = frozenset(
    {"model", "messages", "n", "policy", "metadata", "cancel_when_unwatched_seconds"}
)

#: Members an upstream may understand that tokenfan cannot carry, and why: refused with this reason.
NOT_CARRIED: Final[dict[str, str]] = {
    "stream": "every generation is streamed, to its subscribers; leave it out",
    "stream_options": "tokenfan asks the upstream for its usage report itself; leave it out",
    "logprobs": "events carry no log probabilities",
    "top_logprobs": "events carry no log probabilities",
    "modalities": "events carry text, reasoning and tool calls only",
    "audio": "events carry text, reasoning and tool calls only",
    "functions": "the deprecated function-calling API streams no tool_calls; use tools",
    "function_call": "the deprecated function-calling API streams no tool_calls; use tool_choice",
}
