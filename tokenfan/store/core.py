"""What every part of the `Store` shares: its client, its scripts and its settings."""

from __future__ import annotations

import time

from redis.exceptions import RedisClusterException

from tokenfan.store.connection import Client
from tokenfan.store.scripts import Scripts
from tokenfan.store.slots import slot_of
from tokenfan.store.topology import SINGLE, Topology

__all__ = ["StoreCore", "now_ms", "pairs"]


def now_ms() -> int:
    return int(time.time() * 1000)


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A hash or stream entry as a script returns it (field, value, field, value...) as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class StoreCore:
    """The state the store's families of calls (accepting, snapshots, presence, attempts, writes, resume)
    work on. One per process; safe to share between tasks."""

    def __init__(
        self,
        redis: Client,
        *,
        session_ttl_seconds: int,
        stream_max_length: int,
        lease_ms: int = 30_000,
        max_attempts: int = 3,
        generations_kept: int = 1_000,
    ) -> None:
        self.redis = redis
        self.topology = Topology(redis)
        self.session_ttl_seconds = session_ttl_seconds
        self.stream_max_length = stream_max_length
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.generations_kept = generations_kept
        self.scripts = Scripts(redis)

    def session_node(self, session_id: str) -> str:
        """The name of the node serving `session_id` now, as last learnt: one name on a single Redis, and that
        same name while the slot map is not known yet (the session's calls find their node anyway). Work
        done for many sessions is grouped by it (the worker's flushes and lease renewals, the relays'
        presence claims), so that a node that stops answering holds up its own sessions' work and nobody
        else's (`tokenfan.store.per_node.PerNode`)."""
        try:
            return self.topology.node_of(slot_of(session_id))
        except (RedisClusterException, KeyError):
            return SINGLE
