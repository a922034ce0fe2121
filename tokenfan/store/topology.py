"""Where each slot lives: the one node of a single Redis, or the primary serving it in a cluster.

The cluster client routes single commands itself (following MOVED and ASK). Two things it cannot do are
done here, on plain clients of one node each: pipelines of script calls (redis-py's cluster pipeline
refuses EVALSHA), and sharded pub/sub (its asyncio cluster client has no pub/sub). `refresh` reloads the
slot map after a failover or a resharding; concurrent callers share one reload, and it is asked first of the
node that answers first (`_answering_first`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.asyncio.cluster import NodesManager, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from tokenfan.store import connection
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
        self._ordered: asyncio.Future[None] | None = None  # the seeds put in order before the first map
        self._hiredis_packing = False

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

    async def ready(self) -> None:
        """Learn the slot map (once; a cluster client does it on its first command anyway), first putting the
        seed that answers first at the head of the seeds, as `refresh` does: a process starting while its first
        seed hangs learns the map from another. Raises a `RedisError` when no node answers (redis-py's own
        exception there is not one)."""
        if isinstance(self.redis, RedisCluster):
            if self._ordered is None:
                self._ordered = asyncio.ensure_future(_answering_first(self.redis))
            await asyncio.shield(self._ordered)
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
            self._refreshing = asyncio.ensure_future(self._reload(self.redis))
        with _as_redis_error():
            await asyncio.shield(self._refreshing)

    @staticmethod
    async def _reload(cluster: RedisCluster) -> None:
        await _answering_first(cluster)
        await cluster.nodes_manager.initialize()

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()


async def _answering_first(cluster: RedisCluster) -> None:
    """Put first among the nodes the slot map is asked of the one that answers a PING first, asking them all
    at once; leave the order as it is when none answers within `ANSWER_SECONDS`.

    redis-py asks them one after another, each for up to `ANSWER_SECONDS`. So when the first of them hangs,
    every reload waits that long, and a reload is what every client does when the cluster changes: the
    surviving primaries answer CLUSTERDOWN for a moment when one fails, and each process reloaded the map
    then, held up by a hung first seed, its writes to the healthy primaries included (bench/failover.py,
    ``--fault stop``). The order is the client's own for later reloads too, its own included."""
    manager: NodesManager = cluster.nodes_manager
    nodes = list(manager.startup_nodes.values())
    if len(nodes) < 2:
        return
    probes = [asyncio.ensure_future(_ping(cluster, node.host, int(node.port))) for node in nodes]
    try:
        for probe in asyncio.as_completed(probes, timeout=connection.ANSWER_SECONDS):
            try:
                first = await probe
            except (RedisError, OSError):
                continue  # refused at once: another may answer
            seeds = manager.startup_nodes
            if first in seeds:  # (a reload of redis-py's own may have changed them meanwhile)
                manager.startup_nodes = {
                    first: seeds[first],
                    **{n: s for n, s in seeds.items() if n != first},
                }
            return
    except TimeoutError:
        return
    finally:
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)


async def _ping(cluster: RedisCluster, host: str, port: int) -> str:
    """``host:port`` once that node answers PING, on a connection of its own (closed after)."""
    client = node_client(cluster, host, port, retry=None, retry_on_error=[])  # one try, then the next node
    try:
        await client.ping()
    finally:
        await client.aclose()
    return f"{host}:{port}"


@contextlib.contextmanager
def _as_redis_error() -> Iterator[None]:
    try:
        yield
    except RedisClusterException as exc:
        if "not enabled" in str(exc):
            raise  # not an outage: a node that is no cluster node (Store.verify reports it)
        raise RedisConnectionError(str(exc)) from exc
