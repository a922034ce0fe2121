"""Who watches a session: claims by the processes serving its subscribers."""

from __future__ import annotations

from redis.asyncio import Redis

from tests.store.helpers import make_store
from tests.support.requests import new_session_id


async def test_a_session_is_watched_while_some_process_claims_it(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    other = new_session_id()
    assert await store.watched([session_id, other]) == [False, False]
    await store.claim_watching([session_id], "relay-1", ttl_ms=60_000)
    await store.claim_watching([session_id, other], "relay-2", ttl_ms=60_000)
    assert await store.watched([session_id, other]) == [True, True]
    await store.release_watching(other, "relay-2")
    await store.release_watching(session_id, "relay-1")
    assert await store.watched([session_id, other]) == [True, False]  # relay-2 still serves session_id


async def test_an_expired_claim_does_not_count(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    await store.claim_watching([session_id], "gone", ttl_ms=-1)  # already over: its process stopped renewing
    assert await store.watched([session_id]) == [False]
