"""The slot map of a Redis Cluster, reloaded while a node hangs: it is asked first of a node that answers.

A cluster of its own: two primaries, no replica and a node timeout longer than the test, so that the hung
primary (SIGSTOP: its connections open and silent) stays in the map throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.support.requests import new_session_id_on
from tokenfan.cli.embedded_cluster import EmbeddedCluster
from tokenfan.store import connection
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
