"""Connections to Redis: the client every process uses, and the worker's faster command packing."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

__all__ = ["REDIS_VERSION_FLOOR", "pack_with_hiredis", "redis_client"]

#: The oldest Redis the store runs on (any Valkey will do): reads after an entry id use exclusive XRANGE
#: ranges (``(<id>``, Redis 6.2), queues use LPOS (6.0.6), and no script carries a ``#!lua`` flags line
#: (7.0). docs/OPERATIONS.md states it, and the test suite passes against a Redis 6.2 server (all but the
#: tests that start a cluster node, which need 7.0's cluster options; the processes connect to no cluster).
REDIS_VERSION_FLOOR = "6.2"


def redis_client(url: str) -> Redis:
    """A client that reconnects and retries commands after a dropped connection.

    Retrying is safe for every script of the store: each is idempotent (accept by generation id, start by
    token, write by seq, lease by attempt).
    """
    tls = {"ssl_check_hostname": True} if url.startswith("rediss://") else {}  # the URL's own choice wins
    return Redis.from_url(  # type: ignore[no-any-return]
        url,
        **tls,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_keepalive=True,
        health_check_interval=15,
    )


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


def pack_with_hiredis(redis: Redis) -> None:
    """Make every connection `redis` opens from now on pack commands with hiredis (when installed)."""
    pool = redis.connection_pool
    if HIREDIS_AVAILABLE and not issubclass(pool.connection_class, _HiredisPacking):
        base = pool.connection_class
        pool.connection_class = type(f"HiredisPacking{base.__name__}", (_HiredisPacking, base), {})
