"""``tokenfan watch``: a session live in the terminal, on the resuming client."""

from __future__ import annotations

import sys

from tokenfan.client import SessionStream

__all__ = ["watch"]


async def watch(
    relay_url: str,
    session_id: str,
    *,
    after: str | None = None,
    as_json: bool = False,
    credential: str | None = None,
) -> None:
    stream = SessionStream(relay_url, session_id, after=after, credential=credential)
    out, err = sys.stdout, sys.stderr
    print(f"watching {session_id} on {relay_url} (Ctrl-C to stop)", file=err, flush=True)
    async for frame in stream:
        if as_json:
            import json

            print(json.dumps(frame, ensure_ascii=False), file=out, flush=True)
            continue
        kind = frame["type"]
        if kind == "delta":
            if "reasoning" in frame:
                print(f"\x1b[2m{frame['reasoning']}\x1b[0m", end="", file=out)
            print(frame.get("content", ""), end="", file=out, flush=True)
        elif kind == "generation.started":
            print(f"\n── {frame['generation_id']} ({frame.get('model', '')}) ──", file=err, flush=True)
        elif kind == "generation.completed":
            print(
                f"\n── completed: {frame.get('finish_reason')}, usage {frame.get('usage')} ──",
                file=err,
                flush=True,
            )
        elif kind in ("generation.failed", "generation.cancelled", "generation.restarted"):
            print(f"\n── {kind}: {frame.get('error') or frame.get('reason') or ''} ──", file=err, flush=True)
