"""The `Store`: typed access to a session's state in Redis, one family of calls per base class."""

from __future__ import annotations

import contextlib

import structlog
from redis.exceptions import RedisClusterException, RedisError

from tokenfan.runtime.settings import Settings, SettingsError
from tokenfan.store.accepting import Accepting
from tokenfan.store.attempts import Attempts
from tokenfan.store.boundary import storage_call
from tokenfan.store.connection import cluster_client, redis_client
from tokenfan.store.presence import Presence
from tokenfan.store.resume import Resume
from tokenfan.store.snapshots import Snapshots
from tokenfan.store.streams import Streams
from tokenfan.store.writes import Writes

__all__ = ["Store", "verify_storage"]

log = structlog.get_logger("tokenfan.store")


class Store(Accepting, Snapshots, Presence, Attempts, Writes, Resume, Streams):
    """Every read and write of a session. One per process; safe to share between tasks.

    API side: `accept`, `request_cancel`, `snapshot`, `generation`, `rate_limit`, presence claims.
    Worker side: `start`, `renew_leases`, `release_lease`, `write`; `session_node` groups sessions by node.
    Relay side: `check_resume`, `tail`, `read_after`.
    Durable Streams (``/ds/``): `stream_meta`, `create_stream`, `append_stream`, `delete_stream`,
    `inherited`, `append_app_events`.
    Every call raises `StorageUnavailable` when Redis fails under it.
    """

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """A store on a new client for ``REDIS_URL`` (a cluster client with ``TOKENFAN_REDIS_CLUSTER``), with
        the settings' TTL, stream length, lease and attempts. Close it with `close()`."""
        url = settings.redis_url.reveal()
        return cls(
            cluster_client(url) if settings.redis_cluster else redis_client(url),
            session_ttl_seconds=settings.session_ttl_seconds,
            stream_max_length=settings.stream_max_length,
            lease_ms=int(settings.lease_seconds * 1000),
            max_attempts=settings.max_attempts,
        )

    @storage_call
    async def close(self) -> None:
        """Close the client's connections (a store made by `from_settings` owns its client)."""
        await self.topology.close()
        await self.redis.aclose()

    @storage_call
    async def ping(self) -> None:
        """Raises `StorageUnavailable` unless Redis answers."""
        await self.redis.ping()


async def verify_storage(settings: Settings) -> None:
    """Check at start-up that `REDIS_URL` is what the settings say: a cluster with
    ``TOKENFAN_REDIS_CLUSTER``, one Redis without it. Raises `SettingsError` (a one-line message) when it is
    not; an unreachable Redis is not an error here: the process starts, and answers 503 meanwhile."""
    store = Store.from_settings(settings)
    try:
        await _verify(store, settings.redis_cluster)
    finally:
        with contextlib.suppress(Exception):
            await store.close()


async def _verify(store: Store, cluster: bool) -> None:
    try:
        if cluster:
            await store.topology.ready()
            return
        info = await store.redis.info("cluster")
    except RedisClusterException:  # the topology raises it only for a node that is no cluster node
        raise SettingsError("TOKENFAN_REDIS_CLUSTER=true, but REDIS_URL is not a cluster node") from None
    except (RedisError, OSError) as exc:
        log.warning("redis_unreachable_at_start", error=str(exc))
        return
    if info.get("cluster_enabled"):
        raise SettingsError("REDIS_URL is a Redis Cluster node: set TOKENFAN_REDIS_CLUSTER=true")
