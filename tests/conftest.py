"""Shared fixtures: real Valkey servers and the system's real processes, started once per test session.

`stack` is the system on one Redis. A module marked ``cluster_too`` runs each of its tests twice: on one
Redis, and on a Redis Cluster of three primaries with a replica each (the job queue on a plain Redis of its
own), with two workers and two relays. The `redis` fixture is a client of whichever the test runs on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import cast

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.requests import new_session_id
from tests.support.stack import RunningStack
from tests.support.waiting import Closer
from tokenfan.cli.embedded_cluster import EmbeddedCluster
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.store.connection import cluster_client

ONE_NODE, CLUSTER = "one-node", "cluster"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("cluster_too") and "stack_kind" in metafunc.fixturenames:
        metafunc.parametrize("stack_kind", [ONE_NODE, CLUSTER], indirect=True, scope="module")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def queue_redis() -> Iterator[EmbeddedRedis]:
    """The plain Redis holding the job queue of the cluster stack."""
    with EmbeddedRedis() as server:
        yield server


def _running(stack: RunningStack, *, workers: int = 1, relays: int = 1) -> Iterator[RunningStack]:
    with stack.start(workers=workers, relays=relays):
        yield stack


@pytest.fixture(scope="session")
def single_stack(redis_server: EmbeddedRedis) -> Iterator[RunningStack]:
    yield from _running(RunningStack(redis_url=redis_server.url))


@pytest.fixture(scope="session")
def cluster_stack(redis_cluster: EmbeddedCluster, queue_redis: EmbeddedRedis) -> Iterator[RunningStack]:
    yield from _running(
        RunningStack(redis_url=redis_cluster.url, queue_url=queue_redis.url), workers=2, relays=2
    )


@pytest.fixture(scope="module")
def stack_kind(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", ONE_NODE))


@pytest.fixture(scope="module")
def stack(stack_kind: str, request: pytest.FixtureRequest) -> RunningStack:
    running: RunningStack = request.getfixturevalue(
        "cluster_stack" if stack_kind == CLUSTER else "single_stack"
    )
    return running


@pytest.fixture
async def redis(stack_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A client of the Redis the test runs on (a cluster client, typed as a plain one: the same calls)."""
    if stack_kind == CLUSTER:
        cluster: EmbeddedCluster = request.getfixturevalue("redis_cluster")
        client = cast(Redis, cluster_client(cluster.url))
    else:
        server: EmbeddedRedis = request.getfixturevalue("redis_server")
        client = Redis.from_url(server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def api(stack: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as client:
        yield client


@pytest.fixture
def session_id() -> str:
    return new_session_id()


@pytest.fixture
async def opened() -> AsyncIterator[Closer]:
    """Connections a test opens, closed at its end whatever the outcome."""
    closer = Closer()
    yield closer
    await closer.close_all()
