"""Connections to Redis: the client every process uses, and the worker's faster command packing."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

__all__ = [
    "ANSWER_SECONDS",
    "REDIS_VERSION_FLOOR",
    "Client",
    "cluster_client",
    "node_client",
    "pack_with_hiredis",
    "redis_client",
]

#: What the store speaks to: one Redis, or a Redis Cluster.
Client = Redis | RedisCluster


def _options(url: str) -> dict[str, Any]:
    tls = {"ssl_check_hostname": True} if url.startswith("rediss://") else {}  # the URL's own choice wins
    return {
        **tls,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_keepalive": True,
    }


#: How long a node may take to answer a command of the cluster client, or a pipeline of script calls
#: (`tokenfan.store.batch`). Redis answers in milliseconds; this only ever runs out on a node that is not
#: answering at all.
ANSWER_SECONDS = 5.0

#: The oldest Redis the store runs on (Valkey 7.2 and newer likewise): the live tail is sharded pub/sub
#: (SPUBLISH, SSUBSCRIBE: Redis 7.0), reads after an entry id use exclusive XRANGE ranges (6.2) and queues
#: LPOS (6.0.6). docs/OPERATIONS.md states it, and a test holds the document to it.
REDIS_VERSION_FLOOR = "7.0"


def redis_client(url: str, *, client_name: str | None = None) -> Redis:
    """A client that reconnects and retries commands after a dropped connection; `client_name` names its
    connections (``CLIENT LIST``).

    Retrying is safe for every script of the store: each is idempotent (accept by generation id, start by
    token, write by seq, lease by attempt).
    """
    return Redis.from_url(  # type: ignore[no-any-return]
        url, **_options(url), health_check_interval=15, client_name=client_name
    )


def cluster_client(urls: str, *, client_name: str | None = None) -> RedisCluster:
    """A Redis Cluster client from one or more seed URLs (comma-separated), each ``redis://`` or
    ``rediss://`` with the same credentials. It follows MOVED and ASK, and reloads the slot map after a
    failover; like `redis_client`, it retries what a dropped connection interrupted. `client_name` names
    its connections on every node, those of `node_client` included."""
    seeds = [url.strip() for url in urls.split(",") if url.strip()]
    first = urlsplit(seeds[0])
    nodes = [ClusterNode(urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 6379) for url in seeds]
    # A node that hangs (or is cut off without a reset) would hold a command for as long as TCP takes to give
    # up; the slot map's reload asks the seeds one after another and would never reach the second. The cluster
    # client carries no blocking command and no subscription (those go through `node_client`s, which do not
    # take this), so a command unanswered this long means the node is away.
    options = {
        **_options(seeds[0]),
        "socket_timeout": ANSWER_SECONDS,
        "socket_connect_timeout": ANSWER_SECONDS,
    }
    client: RedisCluster = RedisCluster(
        startup_nodes=nodes,
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        ssl=first.scheme == "rediss",
        client_name=client_name,
        **options,
    )
    return client


def node_client(cluster: RedisCluster, host: str, port: int, **overrides: Any) -> Redis:
    """A plain client for one node of `cluster`, with the cluster's credentials and TLS: for what the
    cluster client cannot do itself (pipelines of scripts, sharded pub/sub). `overrides` are options of
    `redis.asyncio.Redis` that differ from those."""
    kwargs = cluster.get_connection_kwargs()
    keep = ("username", "password", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
            "ssl_check_hostname", "socket_keepalive", "retry", "retry_on_error", "client_name")  # fmt: skip
    options: dict[str, Any] = {key: kwargs[key] for key in keep if key in kwargs}
    return Redis(host=host, port=port, **{**options, **overrides})


class _HiredisPacking:
    """Packs commands with hiredis (C), as redis-py's synchronous connections already do.

    redis-py 5's asyncio connection packs in Python, growing one buffer by concatenation per argument: about
    1 us per argument on small commands and far more on large ones. The writer's one script call per flush
    carries some 20 arguments per generation, so at 500 generations that packing alone cost more than
    reading the tokens (docs/BENCHMARKS.md). The bytes sent are the same."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


def pack_with_hiredis(redis: Client) -> None:
    """Make every connection `redis` opens from now on pack commands with hiredis (when installed). A
    cluster client opens its connections itself, per node, for single commands: it is left as it is; the
    per-node clients that carry its pipelines are packed by `Topology.pack_with_hiredis`."""
    if isinstance(redis, RedisCluster):
        return
    pool = redis.connection_pool
    if HIREDIS_AVAILABLE and not issubclass(pool.connection_class, _HiredisPacking):
        base = pool.connection_class
        pool.connection_class = type(f"HiredisPacking{base.__name__}", (_HiredisPacking, base), {})
