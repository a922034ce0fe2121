"""The slot of a session: computed here as a cluster node computes it, for every one of its keys."""

from __future__ import annotations

from redis.asyncio import Redis

from tests.support.requests import new_session_id
from tokenfan.contract.keys import SessionKeys
from tokenfan.store import slot_of


def test_the_checksum_is_redis_clusters() -> None:
    assert slot_of("123456789") == 0x31C3 % 16384  # CRC-16/XMODEM's check value, from the cluster spec


async def test_every_key_of_a_session_lies_in_the_sessions_slot(cluster_redis: Redis) -> None:
    for session_id in [new_session_id() for _ in range(20)] + ["a", "A.b_c-9"]:
        keys = SessionKeys(session_id)
        names = [keys.events, keys.meta, keys.queue, keys.generations, keys.live, keys.watchers]
        names += [keys.generation("g"), keys.generation_text("g"), keys.generation_reasoning("g")]
        names.append(keys.idempotency("client {key} with braces"))
        for name in names:
            assert await cluster_redis.cluster("KEYSLOT", name) == slot_of(session_id), name
