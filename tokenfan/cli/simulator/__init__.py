"""An OpenAI-compatible chat.completions server with deterministic replies and injectable faults.

It is the default upstream of ``tokenfan up`` and the upstream of every test, so the worker's real
``openai`` client code path runs end to end without a provider. Endpoints: ``POST /v1/chat/completions``
(streaming and not), ``GET /v1/models``, ``GET /healthz`` and ``GET /_sim/stats`` (request and stream
counters, which is how a test proves that a client closed its connection).

A reply is a pure function of the request's model and messages: `reply_chunks` predicts it exactly.

A ``<<sim {json}>>`` directive in the last user message shapes that one request. It travels unchanged
from our API through the worker, which is what lets tests inject faults end to end. Options:

==================  ==================================================================================
``tokens``          reply length in tokens (default: ``SimulatorConfig.reply_tokens``)
``rate``            tokens per second for this request; 0 = full speed
``chunks``          stream exactly these content pieces instead of generated words
``reasoning``       pieces streamed as ``delta.reasoning_content`` before the content
``tool_calls``      ``[{"name", "arguments", "id"?}]`` streamed after the content the way OpenAI does;
                    ``tool_chunk`` (default 7) characters of arguments per delta; ``parallel: true``
                    interleaves the calls' deltas round-robin
``status``          answer with this HTTP error instead; ``retry_after`` sets ``Retry-After``
``drop_after``      after N content pieces, cut the connection mid-body (no finish chunk, no [DONE])
``stall_after``     after N content pieces, send nothing more until the client leaves
``error_after``     after N content pieces, send ``data: {"error": ...}`` and end the body
``times``           arm the faults above only for the first N requests sharing ``key`` (default: the
                    directive's text); later ones succeed
``usage``           ``final`` (default when ``stream_options.include_usage``), ``none``, ``every``
``empty_deltas``    interleave ``delta: {}`` and ``delta: {"content": ""}`` chunks (a provider quirk)
``extra_fields``    add unknown top-level and delta fields a client must ignore
``finish_reason``   override the final finish_reason
``cumulative``      each chunk carries all of its channel's text so far (content, reasoning), as DashScope
                    does with ``incremental_output`` off, instead of what is new
``tool_index``      ``false``: tool-call deltas carry no ``index`` (the id comes with each call's first);
                    not with ``parallel``
==================  ==================================================================================

``chunks`` and ``reasoning`` may hold lone surrogates (a piece ending within an emoji's surrogate pair):
they go out as JSON escapes (``"\\ud83d"``), valid JSON that some providers send.

Unknown options are a 400. Started with ``--models a,b`` (`SimulatorConfig.models`), it refuses any other model
with 404 ``model_not_found``, as OpenAI does. ``max_completion_tokens``/``max_tokens`` cap reasoning + content (finish
reason ``length``). ``drop_after``/``stall_after``/``error_after``, ``usage`` and ``empty_deltas`` shape
streams only; a non-streaming request ignores them.
"""

from tokenfan.cli.simulator.options import Directive, SimToolCall, SimulatorConfig, parse_directive
from tokenfan.cli.simulator.reply import reply_chunks
from tokenfan.cli.simulator.server import create_app, serve

__all__ = [
    "Directive",
    "SimToolCall",
    "SimulatorConfig",
    "create_app",
    "parse_directive",
    "reply_chunks",
    "serve",
]
