"""The store's boundary: no Redis exception leaves it. Each is translated to `StorageUnavailable` here,
once, so the floors above handle one documented error (503, close 1013) and import no Redis library."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from tokenfan.contract.errors import StorageUnavailable

__all__ = ["storage_call", "storage_errors"]

P = ParamSpec("P")
R = TypeVar("R")

#: What a Redis client raises when Redis is away, slow, or refusing (OSError: a socket failed under it;
#: RedisClusterException: a cluster client that found no usable cluster, which redis-py does not count
#: among its RedisErrors).
_STORAGE_FAILURES = (RedisError, RedisClusterException, OSError)


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Translate any Redis failure inside the block to `StorageUnavailable` (the original as its cause)."""
    try:
        yield
    except _STORAGE_FAILURES as exc:
        raise StorageUnavailable() from exc


def storage_call(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorate a coroutine function of the store: Redis failures leave it as `StorageUnavailable`."""

    @functools.wraps(method)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _STORAGE_FAILURES as exc:
            raise StorageUnavailable() from exc

    return translated
