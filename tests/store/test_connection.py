"""The client every process uses, and the worker's command packing: the same bytes, sent faster."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.utils import HIREDIS_AVAILABLE

from tests.store.helpers import resolved
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.store.connection import pack_with_hiredis, redis_client


async def test_a_command_survives_its_connection_being_dropped(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    client = redis_client(redis_server.url)
    try:
        await client.set("tf:test:dropped", "before")
        killed = await redis.client_kill_filter(_id=await client.client_id())
        assert killed == 1
        assert await resolved(client.get("tf:test:dropped")) == b"before"  # reconnected and retried
    finally:
        await client.aclose()


async def test_hiredis_packing_sends_the_same_bytes(redis_server: EmbeddedRedis) -> None:
    assert HIREDIS_AVAILABLE  # a declared dependency (redis[hiredis]): without it the worker packs slowly
    client = redis_client(redis_server.url)
    pack_with_hiredis(client)
    pack_with_hiredis(client)  # twice changes nothing
    try:
        pool = client.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)  # as the pool makes them
        args = ("EVALSHA", "abc", 2, "k1", "k2", 7, 1.5, "日本", b"\x00\xff")
        assert type(connection).__name__ == "HiredisPackingConnection"
        assert b"".join(connection.pack_command(*args)) == b"".join(
            Connection.pack_command(connection, *args)
        )
        await client.set("tf:test:packed", "日本")
        assert await resolved(client.get("tf:test:packed")) == "日本".encode()
    finally:
        await client.aclose()
