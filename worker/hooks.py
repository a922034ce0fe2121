"""Worker hooks: your code inside each generation, for example to attach the RAG sources an answer uses.

``TOKENFAN_WORKER_HOOKS=package.module:attribute`` names an object with either or both of::

    async def on_start(ctx: HookContext) -> None             # before the upstream is called
    async def before_finish(ctx: HookContext, status: str) -> None  # before the terminal event

``ctx.emit("sources", items=[...])`` appends an event of type ``x.sources`` to the generation, in order with
its other events, so every subscriber sees it where it belongs. ``ctx.request`` is the accepted request
(with its ``metadata``). A hook that raises fails the generation with ``internal_error``; one that
emits a malformed event is told so at once. A cancellation arriving while ``on_start`` runs cancels it
(``asyncio.CancelledError``): the generation then ends cancelled, and the upstream is never called.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Protocol

from tokenfan.contract.events import encode_body
from worker.stream_writer import GenerationStream

__all__ = ["HookContext", "Hooks", "load_hooks"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_RESERVED = frozenset({"type", "session_id", "generation_id", "seq", "offset", "seq_start"})


class HookContext:
    """What a hook sees of one generation attempt."""

    def __init__(self, stream: GenerationStream, request: dict[str, Any]) -> None:
        self._stream = stream
        self.session_id = stream.session_id
        self.generation_id = stream.generation_id
        self.attempt = stream.attempt
        self.request = request
        self.metadata: dict[str, Any] = request.get("metadata") or {}

    def emit(self, name: str, **fields: Any) -> None:
        """Append a custom event ``x.<name>`` carrying `fields` (JSON values). Raises ValueError, here and
        now, for an event that could not be written: a bad name, a reserved member, a value that is not
        JSON, or text that is not valid Unicode (a lone surrogate)."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"custom event names are lowercase a-z 0-9 _ . - (got {name!r})")
        clash = _RESERVED & fields.keys()
        if clash:
            raise ValueError(f"custom events may not set {sorted(clash)}")
        try:
            encode_body(
                fields
            ).encode()  # what the writer will do, later, in the task every generation shares
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            raise ValueError(f"custom event fields must be JSON, with valid Unicode text ({exc})") from None
        self._stream.add_event(f"x.{name}", **fields)


class Hooks(Protocol):
    async def on_start(self, ctx: HookContext) -> None: ...

    async def before_finish(self, ctx: HookContext, status: str) -> None: ...


class _NoHooks:
    async def on_start(self, ctx: HookContext) -> None:
        return None

    async def before_finish(self, ctx: HookContext, status: str) -> None:
        return None


def load_hooks(spec: str | None) -> Hooks:
    """Import ``module:attribute``; a missing method is a no-op. Raises ValueError/ImportError at start-up."""
    if not spec:
        return _NoHooks()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"TOKENFAN_WORKER_HOOKS must look like 'package.module:attribute', got {spec!r}")
    target = getattr(importlib.import_module(module_name), attribute)
    fallback = _NoHooks()

    class _Bound:
        on_start = getattr(target, "on_start", fallback.on_start)
        before_finish = getattr(target, "before_finish", fallback.before_finish)

    return _Bound()
