"""On a Redis Cluster, a primary that stops answering holds up the writes of its own sessions and nobody
else's: the worker's writer flushes each node's generations on their own (`worker.stream_writer.FlushLane`).

A cluster of its own: two primaries, no replica and a node timeout longer than the test, so that the stopped
primary (SIGSTOP: a node that hangs, its connections open and silent) stays the one its slots wait for.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.store.helpers import running
from tests.support.requests import new_session_id_on
from tests.support.waiting import wait_for_condition
from tokenfan.cli.embedded_cluster import EmbeddedCluster
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.events import EventType, GenerationStatus
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import StreamId
from tokenfan.store import Finish, Store
from tokenfan.store.connection import cluster_client
from worker.stream_writer import GenerationStream, StreamWriter

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=2, replicas=0, node_timeout_ms=120_000) as running_cluster:
        yield running_cluster


@pytest.fixture
async def client(cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    redis = cluster_client(cluster.url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def writer(client: RedisCluster) -> AsyncIterator[StreamWriter]:
    store = Store(client, session_ttl_seconds=3600, stream_max_length=1000)
    await store.topology.ready()
    writer = StreamWriter(store)
    flusher = asyncio.create_task(writer.run())
    yield writer
    assert not flusher.done(), "the flusher ended"
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    await store.topology.close()  # the clients of each node it made (the cluster's own: `client`)


async def opened(writer: StreamWriter, store: Store, session_id: str) -> GenerationStream:
    generation_id, attempt = await running(store, session_id)
    return writer.open(session_id, generation_id, attempt, 0)


async def stored_text(client: RedisCluster, stream: GenerationStream) -> bytes | None:
    text: bytes | None = await client.get(
        SessionKeys(stream.session_id).generation_text(stream.generation_id)
    )
    return text


async def generation_events(store: Store, stream: GenerationStream) -> list[dict[str, Any]]:
    """The events of `stream`'s generation in its session's stream, oldest first."""
    entries = await store.read_after(stream.session_id, StreamId.ZERO, 100, strict=False)
    bodies = [json.loads(entry.body) for entry in entries]
    return [body for body in bodies if body.get("generation_id") == stream.generation_id]


@pytest.fixture
def stopped(cluster: EmbeddedCluster) -> Iterator[EmbeddedRedis]:
    """The first primary, hung (SIGSTOP) for the test's body; it answers again (SIGCONT) at its end, whatever
    the outcome."""
    node = cluster.primaries[0]
    yield node
    node.resume()


async def test_a_hung_primary_holds_up_its_own_sessions_and_the_others_go_on(
    cluster: EmbeddedCluster, client: RedisCluster, writer: StreamWriter, stopped: EmbeddedRedis
) -> None:
    store = writer.store
    (flowing_node,) = (node for node in cluster.primaries if node is not stopped)
    held = await opened(writer, store, new_session_id_on(cluster, stopped))
    flowing = await opened(writer, store, new_session_id_on(cluster, flowing_node))
    stopped.pause()

    held.add_content("held ")
    flowing.add_content("flows")  # in the same flush as the held piece, were all nodes flushed together

    async def flowed(text: bytes) -> bool:
        return await stored_text(client, flowing) == text

    await wait_for_condition(lambda: flowed(b"flows"))
    flowing.add_content(", and goes on")  # the next flush of its node does not wait for the hung one
    await wait_for_condition(lambda: flowed(b"flows, and goes on"))
    done = await flowing.finish(EventType.GENERATION_COMPLETED, Finish(GenerationStatus.COMPLETED))
    assert done.last_offset is not None
    assert held.last_offset is None  # its first write has not landed: the node it waits for is hung

    held.add_content("back")  # waits in its generation, behind the write in flight
    stopped.resume()

    async def caught_up() -> bool:
        return await stored_text(client, held) == b"held back"

    await wait_for_condition(caught_up)
    finished = await held.finish(EventType.GENERATION_COMPLETED, Finish(GenerationStatus.COMPLETED))
    assert finished.last_offset is not None
    events = await generation_events(store, held)
    assert [event["content"] for event in events if event["type"] == "delta"] == ["held ", "back"]
    assert [event["seq"] for event in events] == [1, 2, 3]  # each event once, none lost
    assert events[-1]["type"] == "generation.completed"
