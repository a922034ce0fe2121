"""The store's boundary: no Redis exception leaves it. Each is translated to `StorageUnavailable` here,
once, so the floors above handle one documented error (503, close 1013) and import no Redis library.

Every failure is also counted here, by operation and error type (`count_failure`, `redis_failures`): the
one place all of them pass, so a process's metrics (``tokenfan_redis_errors_total``) miss none. The
store's long-lived readers (the live tail, the cancellation listener, the job queue's poll) handle their
failures themselves, and count them with `count_failure`.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from tokenfan.contract.errors import StorageUnavailable
from tokenfan.runtime.metrics import Metrics

__all__ = ["count_failure", "expose_redis_errors", "redis_failures", "storage_call", "storage_errors"]

P = ParamSpec("P")
R = TypeVar("R")

#: What a Redis client raises when Redis is away, slow, or refusing (OSError: a socket failed under it;
#: RedisClusterException: a cluster client that found no usable cluster, which redis-py does not count
#: among its RedisErrors).
_STORAGE_FAILURES = (RedisError, RedisClusterException, OSError)

#: Failures seen by this process, by (operation, error type). A module's tally rather than an object passed
#: in: `storage_call` decorates functions before any process exists, and each process is one component.
_failures: Counter[tuple[str, str]] = Counter()


def count_failure(operation: str, error: BaseException) -> None:
    """Count one Redis failure of `operation` (a store function's name, or a reader's)."""
    _failures[(operation, type(error).__name__)] += 1


def redis_failures() -> dict[tuple[str, str], int]:
    """The failures counted so far in this process, by (operation, error type)."""
    return dict(_failures)  # one copy under the GIL: a scrape's thread may call this


def expose_redis_errors(metrics: Metrics) -> None:
    """Show this process's Redis failures on `metrics`, read at each scrape."""
    metrics.counts(
        "tokenfan_redis_errors_total",
        "Redis commands that failed, by store operation (or reader: live_tail, cancel_listener, job_queue) "
        "and error type.",
        ("operation", "error"),
        redis_failures,
    )


@contextlib.contextmanager
def storage_errors(operation: str) -> Iterator[None]:
    """Translate any Redis failure inside the block to `StorageUnavailable` (the original as its cause)."""
    try:
        yield
    except _STORAGE_FAILURES as exc:
        count_failure(operation, exc)
        raise StorageUnavailable() from exc


def storage_call(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorate a coroutine function of the store: Redis failures leave it as `StorageUnavailable`."""

    operation = method.__qualname__

    @functools.wraps(method)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _STORAGE_FAILURES as exc:
            count_failure(operation, exc)
            raise StorageUnavailable() from exc

    return translated
