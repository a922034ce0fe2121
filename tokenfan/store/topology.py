"""Where each slot lives: the one node of a single Redis, or the primary serving it in a cluster.

The cluster client routes single commands itself (following MOVED and ASK). Two things it cannot do are
done here, on plain clients of one node each: pipelines of script calls (redis-py's cluster pipeline
refuses EVALSHA), and sharded pub/sub (its asyncio cluster client has no pub/sub). `refresh` reloads the
slot map after a failover or a resharding; concurrent callers share one reload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from tokenfan.store.connection import Client, node_client, pack_with_hiredis

__all__ = ["Topology"]

#: The name of the one node of a single Redis.
SINGLE = "single"


class Topology:
    """The nodes behind one client, and a plain client for each."""

    def __init__(self, redis: Client) -> None:
        self.redis = redis
        self._clients: dict[str, Redis] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._hiredis_packing = False

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

    async def ready(self) -> None:
        """Learn the slot map (once; a cluster client does it on its first command anyway). Raises a
        `RedisError` when no node answers (redis-py's own exception there is not one)."""
        if isinstance(self.redis, RedisCluster):
            with _as_redis_error():
                await self.redis.initialize()

    def node_of(self, slot: int) -> str:
        """The name of the node serving `slot` now (as last learnt)."""
        if not isinstance(self.redis, RedisCluster):
            return SINGLE
        return str(self.redis.nodes_manager.get_node_from_slot(slot).name)

    def primaries(self) -> list[str]:
        if not isinstance(self.redis, RedisCluster):
            return [SINGLE]
        return [str(node.name) for node in self.redis.get_primaries()]

    def client(self, name: str) -> Redis:
        """A plain client of node `name` (the client itself on a single Redis)."""
        if isinstance(self.redis, Redis):
            return self.redis
        client = self._clients.get(name)
        if client is None:
            host, _, port = name.rpartition(":")
            client = self._clients[name] = node_client(self.redis, host, int(port))
            if self._hiredis_packing:
                pack_with_hiredis(client)
        return client

    def pack_with_hiredis(self) -> None:
        """Pack commands with hiredis on every connection that carries pipelines of script calls: the
        client's own on a single Redis, each node's on a cluster (see `pack_with_hiredis`). The worker's
        flushes are those pipelines."""
        self._hiredis_packing = True
        for client in [self.redis, *self._clients.values()]:
            pack_with_hiredis(client)

    async def refresh(self) -> None:
        """Reload the slot map from the cluster (a no-op on a single Redis)."""
        if not isinstance(self.redis, RedisCluster):
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.redis.nodes_manager.initialize())
        with _as_redis_error():
            await asyncio.shield(self._refreshing)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()


@contextlib.contextmanager
def _as_redis_error() -> Iterator[None]:
    try:
        yield
    except RedisClusterException as exc:
        if "not enabled" in str(exc):
            raise  # not an outage: a node that is no cluster node (Store.verify reports it)
        raise RedisConnectionError(str(exc)) from exc
