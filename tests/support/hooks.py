"""Worker hooks used by tests/system/test_faults.py (loaded by the worker through TOKENFAN_WORKER_HOOKS)."""

from __future__ import annotations

from worker.hooks import HookContext


class SourcesHooks:
    """Attaches the RAG sources named in a request's metadata, and a closing note."""

    async def on_start(self, ctx: HookContext) -> None:
        sources = ctx.metadata.get("sources")
        if sources:
            ctx.emit("sources", items=sources)

    async def before_finish(self, ctx: HookContext, status: str) -> None:
        if ctx.metadata.get("sources"):
            ctx.emit("note", status=status)


hooks = SourcesHooks()
