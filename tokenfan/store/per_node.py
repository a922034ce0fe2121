"""Periodic work for many sessions, done node by node (`StoreCore.session_node`), at most one piece per node
in flight.

A worker renews its generations' leases, and a relay or API process claims the sessions it serves, every few
seconds, each in one round trip. Were all nodes in one call, a node that hangs would hold up everyone's
renewals or claims until it answered, and the others' leases and claims would lapse meanwhile (a generation
restarted by another worker, one cancelled as unwatched). Node by node, the hung node's work waits, and is
not started again while it does; every other node's goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["PerNode"]


class PerNode:
    """The pieces of work in flight, by node. `start` skips a node whose last piece has not ended; `close`
    cancels them all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._running: dict[str, asyncio.Task[None]] = {}

    def start(self, node: str, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work` for `node` unless its last piece is still in flight (then `work` is closed unrun);
        whether it was started. A piece that ended with an exception raises it here, at the next start: a bug
        in the work (which deals with the store's own failures itself) stops the loop that starts it, as it
        did when the loop awaited the work itself."""
        self._reap()
        if node in self._running:
            work.close()
            return False
        self._running[node] = asyncio.create_task(work, name=f"{self.name} {node}")
        return True

    def _reap(self) -> None:
        for node, task in list(self._running.items()):
            if task.done():
                del self._running[node]
                task.result()

    def close(self) -> None:
        for task in self._running.values():
            task.cancel()
        self._running.clear()
