"""Who watches what: each relay and API process claims, in Redis, the sessions it has subscribers of, and
how many.

Workers read the claims to cancel generations that asked to be cancelled once nobody watches them
(``cancel_when_unwatched_seconds``); ``tokenfan top`` sums them into the busiest sessions. A claim lasts
three intervals, so a process that dies stops claiming within that time without any cleanup.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable

import structlog

from tokenfan.contract.errors import StorageUnavailable
from tokenfan.store import Store
from tokenfan.store.per_node import PerNode

__all__ = ["publish_presence"]

log = structlog.get_logger("tokenfan.presence")


async def publish_presence(watching: Callable[[], dict[str, int]], store: Store, *, interval: float) -> None:
    """Claim the sessions `watching()` names (with their subscribers), every `interval` seconds, for the
    life of the process: node by node (`PerNode`), so that a node that does not answer keeps its own
    sessions' claims from being renewed and nobody else's."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    claimed: dict[str, dict[str, int]] = {}  # by node: what its last claim that landed named

    async def claim(node: str, sessions: dict[str, int]) -> None:
        previous = claimed.get(node, {})
        try:
            if sessions or previous:
                await store.claim_watching(sessions, owner, ttl_ms=int(interval * 3000), previous=previous)
        except StorageUnavailable as exc:
            log.warning("presence_failed", error=str(exc.__cause__), node=node)
            return
        if sessions:
            claimed[node] = sessions
        else:
            claimed.pop(node, None)

    claims = PerNode("presence")
    try:
        while True:
            by_node: dict[str, dict[str, int]] = {node: {} for node in claimed}  # nodes to clear, at least
            for session_id, count in watching().items():
                by_node.setdefault(store.session_node(session_id), {})[session_id] = count
            for node, sessions in by_node.items():
                claims.start(node, claim(node, sessions))
            await asyncio.sleep(interval)
    finally:
        claims.close()
