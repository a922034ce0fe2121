"""The store's face: its public names, its settings, and the one error its calls raise."""

from __future__ import annotations

import inspect

import pytest

import tokenfan.store
from tokenfan.cli.embedded_redis import EmbeddedRedis, free_port
from tokenfan.contract.errors import StorageUnavailable
from tokenfan.runtime.settings import Settings
from tokenfan.store import Store

#: What the other floors import from `tokenfan.store` (and must keep importing after any reshuffle).
PUBLIC = {
    "AcceptOutcome",
    "AcceptResult",
    "EventWrite",
    "Finish",
    "GenerationRecord",
    "LeaseReply",
    "SessionSnapshot",
    "StartOutcome",
    "StartResult",
    "Store",
    "WriteItem",
    "WriteOutcome",
    "WriteResult",
    "redis_client",
    "slot_of",
    "verify_storage",
}


def test_the_face_exports_the_public_surface() -> None:
    assert set(tokenfan.store.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(tokenfan.store, name) is not None


def test_every_call_of_the_store_leaves_redis_failures_as_storage_unavailable() -> None:
    """Each public coroutine is wrapped by the boundary (`storage_call` leaves ``__wrapped__``)."""
    calls = {
        name: member
        for name, member in inspect.getmembers(Store)
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    }
    assert {"accept", "write", "snapshot", "check_resume", "ping"} <= set(calls)
    for name, member in calls.items():
        assert hasattr(member, "__wrapped__"), f"Store.{name} is not a storage_call"


async def test_a_store_from_settings_talks_to_its_redis(redis_server: EmbeddedRedis) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_server.url, "TOKENFAN_LEASE_SECONDS": "7.5"})
    store = Store.from_settings(settings)
    try:
        assert store.lease_ms == 7_500
        assert (store.session_ttl_seconds, store.max_attempts) == (
            settings.session_ttl_seconds,
            settings.max_attempts,
        )
        await store.ping()
    finally:
        await store.redis.aclose()


async def test_an_unreachable_redis_is_storage_unavailable() -> None:
    store = Store.from_settings(Settings.from_env({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}))
    try:
        with pytest.raises(StorageUnavailable):
            await store.ping()
        with pytest.raises(StorageUnavailable):
            await store.snapshot("s")
    finally:
        await store.redis.aclose()
