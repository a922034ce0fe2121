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

__all__ = ["publish_presence"]

log = structlog.get_logger("tokenfan.presence")


async def publish_presence(watching: Callable[[], dict[str, int]], store: Store, *, interval: float) -> None:
    """Claim the sessions `watching()` names (with their subscribers), every `interval` seconds, for the
    life of the process."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    claimed: dict[str, int] = {}
    while True:
        watched = watching()
        try:
            if watched or claimed:
                await store.claim_watching(watched, owner, ttl_ms=int(interval * 3000), previous=claimed)
            claimed = watched
        except StorageUnavailable as exc:
            log.warning("presence_failed", error=str(exc.__cause__))
        await asyncio.sleep(interval)
