"""The store's boundary: a Redis failure leaves as `StorageUnavailable`, and is counted once, by operation."""

from __future__ import annotations

import socket

import pytest

from tokenfan.contract.errors import StorageUnavailable
from tokenfan.store import Store, redis_client
from tokenfan.store.boundary import redis_failures


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens there once the probe closes


async def test_a_redis_failure_is_translated_and_counted_by_operation_and_error() -> None:
    store = Store(
        redis_client(f"redis://127.0.0.1:{closed_port()}/0"), session_ttl_seconds=60, stream_max_length=10
    )
    before = redis_failures().get(("Store.ping", "ConnectionError"), 0)
    try:
        with pytest.raises(StorageUnavailable):
            await store.ping()
    finally:
        await store.redis.aclose()
    assert redis_failures()[("Store.ping", "ConnectionError")] == before + 1
