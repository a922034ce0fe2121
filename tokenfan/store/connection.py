"""Connections to Redis: the client every process uses."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["redis_client"]


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
