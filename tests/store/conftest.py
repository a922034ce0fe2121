"""The store's own servers: a Valkey in cluster mode, one node owning every slot; and a plain one for the
job queue, which no process of the test stack polls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.store.helpers import MADE
from tests.support.waiting import wait_until
from tokenfan.cli.embedded_cluster import cluster_port
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.store.connection import cluster_client as cluster_client_for


@pytest.fixture(autouse=True)
async def _close_stores() -> AsyncIterator[None]:
    """The clients a store opens per cluster node belong to it; the test's own client is closed apart."""
    yield
    while MADE:
        await MADE.pop().topology.close()


@pytest.fixture(scope="session")
def cluster_server() -> Iterator[EmbeddedRedis]:
    """A real cluster node: it refuses a command (or a script call) whose declared keys span two slots,
    and knows each key's slot (CLUSTER KEYSLOT). One node owns all 16,384 slots, so a plain client works."""
    # Its bus listens 10,000 above its port: both below the ports outgoing connections take (`cluster_port`).
    with EmbeddedRedis(port=cluster_port("127.0.0.1"), extra_args=("--cluster-enabled", "yes")) as server:
        with sync_redis.Redis.from_url(server.url) as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            wait_until(
                lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"),
                "the node never took its slots",
                interval=0.01,
            )
        yield server


@pytest.fixture
async def cluster_redis(cluster_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(cluster_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_client(cluster_server: EmbeddedRedis) -> AsyncIterator[RedisCluster]:
    """The store's own cluster client on that node: it routes by slot, as against a real cluster."""
    client = cluster_client_for(cluster_server.url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def queue_server() -> Iterator[EmbeddedRedis]:
    """A server of the store's tests alone: a job enqueued here is run by no worker but the test's own.
    (arq needs a plain server: its transactions span slots.)"""
    with EmbeddedRedis() as server:
        yield server
