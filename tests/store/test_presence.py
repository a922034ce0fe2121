"""Who watches a session: claims by the processes serving its subscribers, with how many they serve."""

from __future__ import annotations

from redis.asyncio import Redis

from tests.store.helpers import make_store
from tests.support.requests import new_session_id


async def test_a_session_is_watched_while_some_process_claims_it(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    other = new_session_id()
    assert await store.watched([session_id, other]) == [False, False]
    await store.claim_watching({session_id: 1}, "relay-1", ttl_ms=60_000)
    await store.claim_watching({session_id: 2, other: 1}, "relay-2", ttl_ms=60_000)
    assert await store.watched([session_id, other]) == [True, True]
    await store.claim_watching({session_id: 2}, "relay-2", ttl_ms=60_000, previous={session_id: 2, other: 1})
    await store.claim_watching({}, "relay-1", ttl_ms=60_000, previous={session_id: 1})
    assert await store.watched([session_id, other]) == [True, False]  # relay-2 still serves session_id


async def test_an_expired_claim_does_not_count(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    await store.claim_watching(
        {session_id: 3}, "gone", ttl_ms=-1
    )  # already over: its process stopped renewing
    assert await store.watched([session_id]) == [False]
    assert session_id not in [watched[0] for watched in await store.busiest(1_000)]


async def test_the_busiest_sessions_sum_the_subscribers_of_every_process(
    redis: Redis, session_id: str
) -> None:
    store = make_store(redis)
    quiet, busy = new_session_id(), new_session_id()
    await store.claim_watching({session_id: 2, quiet: 1}, "relay-1", ttl_ms=60_000)
    await store.claim_watching({session_id: 3, busy: 100}, "relay-2", ttl_ms=60_000)
    # relay-1's count changed: its earlier claim is replaced, not added to
    await store.claim_watching(
        {session_id: 4, quiet: 1}, "relay-1", ttl_ms=60_000, previous={session_id: 2, quiet: 1}
    )
    found = {watched[0]: watched for watched in await store.busiest(10_000)}
    assert found[busy] == (busy, 100, 1)
    assert found[session_id] == (session_id, 7, 2)
    assert found[quiet] == (quiet, 1, 1)
    ranked = [
        watched[0] for watched in await store.busiest(10_000) if watched[0] in (busy, session_id, quiet)
    ]
    assert ranked == [busy, session_id, quiet]
