"""The live tail on a Redis Cluster whose primary hangs (SIGSTOP: its connections open and silent, no reset):
once the primary's replica has taken over, the tail subscribes the hung primary's sessions again on it and
hears what is written there, while the old primary still hangs.

A cluster of its own: three primaries (two of them outvote the hung one), one replica each, and a one-second
node timeout, so that the replica is promoted within seconds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.store.helpers import make_store, write_texts
from tests.support.requests import new_session_id_on
from tests.support.waiting import wait_for_condition
from tokenfan.cli.embedded_cluster import EmbeddedCluster, command
from tokenfan.contract.offsets import StreamId
from tokenfan.store.connection import cluster_client
from tokenfan.store.tail import LiveTail, Published

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=1000) as running:
        yield running


class Recorder:
    """A tail listener that counts its subscriptions and keeps the ids of what it heard."""

    def __init__(self) -> None:
        self.subscriptions = 0
        self.heard: list[StreamId] = []

    async def subscribed(self, times: int) -> bool:
        return self.subscriptions == times

    def on_subscribed(self) -> None:
        self.subscriptions += 1

    def on_published(self, entries: list[Published]) -> None:
        self.heard += [entry.stream_id for entry, _ in entries]


async def test_a_hung_primarys_sessions_are_heard_again_once_its_replica_takes_over(
    cluster: EmbeddedCluster,
) -> None:
    hung = cluster.primaries[1]
    (replica,) = cluster.replicas_of(hung)
    session_id = new_session_id_on(cluster, hung)
    client = cluster_client(cluster.url)
    store = make_store(client)
    tail = LiveTail(store.topology)
    listener = Recorder()
    try:
        await tail.watch(session_id, listener)
        await wait_for_condition(lambda: listener.subscribed(1))
        hung.pause()
        try:

            async def promoted() -> bool:
                role = command(cluster.host, replica.port, "ROLE")
                return isinstance(role, list) and role[0] == "master"

            await wait_for_condition(promoted, timeout=30)
            # The tail's connection to the hung primary is open and silent: only its pings can tell.
            await wait_for_condition(
                lambda: listener.subscribed(2), timeout=20, message="not subscribed again on the new primary"
            )
            await store.topology.refresh()  # a writer's own next reload would find the new primary too
            _, written = await write_texts(store, session_id, "abc")

            async def heard_all() -> bool:
                return listener.heard == written

            await wait_for_condition(heard_all)
        finally:
            hung.resume()
    finally:
        await tail.close()
        await store.topology.close()
        await client.aclose()
