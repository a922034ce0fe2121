"""The store's own connections while a Redis Cluster node hangs (SIGSTOP: its connections open and silent,
as in a partition): a reload of the slot map, and the first load of a process starting then, are asked
first of a node that answers, and the workers' cancellation listener leaves the hung node for one that
answers.

A cluster of its own: two primaries, no replica and a node timeout longer than the test, so that the hung
primary stays in the map throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from tests.support.requests import new_session_id_on
from tokenfan.cli.embedded_cluster import EmbeddedCluster, command
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import CANCEL_CHANNEL
from tokenfan.store import connection
from tokenfan.store.cancellations import listen_for_cancellations
from tokenfan.store.connection import cluster_client
from tokenfan.store.slots import slot_of
from tokenfan.store.topology import Topology

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=2, replicas=0, node_timeout_ms=120_000) as running:
        yield running


async def test_a_reload_does_not_wait_for_a_hung_first_seed(
    cluster: EmbeddedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node may take this long before it counts as away: a reload that asked the hung seed first would
    # outlast the test's bound below (every process reloads when the cluster changes, its writes waiting).
    monkeypatch.setattr(connection, "ANSWER_SECONDS", 60.0)
    hung, answering = cluster.primaries
    on_answering, on_hung = new_session_id_on(cluster, answering), new_session_id_on(cluster, hung)
    topology = Topology(cluster_client(cluster.url))  # the seeds in order: the hung primary first
    try:
        await topology.ready()
        hung.pause()
        try:
            async with asyncio.timeout(20):
                await topology.refresh()
                await topology.refresh()  # the next one too: the order stays
            assert topology.node_of(slot_of(on_answering)) == f"{answering.host}:{answering.port}"
            assert topology.node_of(slot_of(on_hung)) == f"{hung.host}:{hung.port}"
        finally:
            hung.resume()
    finally:
        await topology.close()
        await topology.redis.aclose()


async def test_a_process_starting_while_its_first_seed_hangs_learns_the_map_from_another(
    cluster: EmbeddedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "ANSWER_SECONDS", 60.0)
    low, high = cluster.primaries
    # redis-py asks the primary of slot 0 for its command table once it has the map: that one must answer.
    assert cluster.primary_of_slot(0) is low
    on_low = new_session_id_on(cluster, low)
    topology = Topology(cluster_client(f"{high.url},{low.url}"))  # the hung primary first among the seeds
    high.pause()
    try:
        async with asyncio.timeout(20):
            await topology.ready()
            assert topology.node_of(slot_of(on_low)) == f"{low.host}:{low.port}"
            assert await topology.redis.set(f"tf:{{{on_low}}}:probe", "1")  # served: its node answers
    finally:
        high.resume()
        await topology.close()
        await topology.redis.aclose()


async def test_the_cancellation_listener_leaves_a_hung_node_for_one_that_answers(
    cluster: EmbeddedCluster,
) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    topology = Topology(cluster_client(cluster.url))  # its slot map not learnt yet, as a starting worker's
    listener = asyncio.create_task(listen_for_cancellations(topology, lambda g, _: heard.put_nowait(g)))
    try:
        await until_heard(heard, cluster.primaries[0])
        (listening,) = (node for node in cluster.primaries if subscribers_on(node))
        (other,) = (node for node in cluster.primaries if node is not listening)
        listening.pause()
        try:
            # Published on the other node, a request reaches every node's subscribers: the listener hears it
            # once it has left the hung node (whose connection stays open and silent) for that one.
            await until_heard(heard, other, within=20)
        finally:
            listening.resume()
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await topology.close()
        await topology.redis.aclose()


def subscribers_on(node: EmbeddedRedis) -> int:
    """The listeners subscribed to cancellations on `node` itself (a classic channel's are per node)."""
    reply = command(node.host, node.port, "PUBSUB", "NUMSUB", CANCEL_CHANNEL)
    assert isinstance(reply, list)
    return int(reply[1])


async def until_heard(heard: asyncio.Queue[str], via: EmbeddedRedis, within: float = 10) -> None:
    """Publish requests on `via` until the listener hears one (one published while it resubscribes is lost)."""
    probe = new_generation_id()
    async with asyncio.timeout(within):
        while True:
            command(via.host, via.port, "PUBLISH", CANCEL_CHANNEL, f"{probe} probe")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    while await heard.get() != probe:
                        pass
                    return
