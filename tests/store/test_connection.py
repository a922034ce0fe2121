"""The client every process uses, and the worker's command packing: the same bytes, sent faster."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.utils import HIREDIS_AVAILABLE

from tests.store.helpers import make_store, resolved
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


async def test_a_cluster_store_packs_with_hiredis_on_every_node_client(cluster_client: RedisCluster) -> None:
    """The worker's flushes go out on per-node clients on a cluster: those pack with hiredis too, whether
    they were made before or after the worker asked for it."""
    early, late = make_store(cluster_client), make_store(cluster_client)
    await early.topology.ready()
    (node,) = early.topology.primaries()
    made_before = early.topology.client(node)
    early.topology.pack_with_hiredis()
    late.topology.pack_with_hiredis()
    for client in (made_before, late.topology.client(node)):
        assert client.connection_pool.connection_class.__name__ == "HiredisPackingConnection"
    await made_before.set("tf:{test}:packed", "日本")
    assert await resolved(made_before.get("tf:{test}:packed")) == "日本".encode()
