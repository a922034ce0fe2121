"""Shared fixtures: a real Valkey server and the system's real processes, started once per test session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.requests import new_session_id
from tests.support.stack import RunningStack
from tokenfan.cli.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def stack(redis_server: EmbeddedRedis) -> Iterator[RunningStack]:
    running = RunningStack(redis_url=redis_server.url)
    try:
        running.start()
        yield running
    except BaseException:
        print(running.log_tail())
        raise
    finally:
        running.stop()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def api(stack: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as client:
        yield client


@pytest.fixture
def session_id() -> str:
    return new_session_id()
