"""A Redis Cluster primary that hangs (SIGSTOP: its connections stay open and silent, as in a partition) while
generations stream on it and on another primary: the other primary's sessions carry on and finish as if
nothing happened, their leases renewed throughout (no other worker could take them over) and their sessions
still claimed by the relay that serves them (none could be cancelled as unwatched), and the hung one's
finish exactly once it answers again; the subscribers of both see every word.

A cluster of its own: two primaries, no replica and a node timeout longer than the test, so that the hung
primary stays the one its slots wait for; one worker with a short lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.support.requests import accept, expected_text, new_session_id_on, user_message
from tests.support.stack import RunningStack
from tests.support.waiting import Closer, wait_for_condition
from tests.support.watchers import Watcher, finished
from tokenfan.cli.embedded_cluster import EmbeddedCluster
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.runtime.settings import Settings
from tokenfan.store import StartOutcome, Store

pytestmark = pytest.mark.fault

LEASE_SECONDS = 1.5
#: The relay claims the sessions it serves this often; a claim lasts three times as long.
PRESENCE_SECONDS = 0.5


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=2, replicas=0, node_timeout_ms=120_000) as running:
        yield running


@pytest.fixture(scope="module")
def hstack(cluster: EmbeddedCluster, queue: EmbeddedRedis) -> Iterator[RunningStack]:
    extra_env = {
        "TOKENFAN_LEASE_SECONDS": str(LEASE_SECONDS),
        "TOKENFAN_PRESENCE_INTERVAL_SECONDS": str(PRESENCE_SECONDS),
    }
    stack = RunningStack(redis_url=cluster.url, queue_url=queue.url, extra_env=extra_env)
    with stack.start(workers=1, relays=1):
        yield stack


@pytest.fixture
async def hapi(hstack: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with hstack.api_client() as client:
        yield client


@contextlib.asynccontextmanager
async def cluster_store(seed: EmbeddedRedis) -> AsyncIterator[Store]:
    """A store of the cluster as a worker's is (its settings, its client), its slot map learnt from `seed`."""
    settings = Settings.from_env(
        {"REDIS_URL": seed.url, "TOKENFAN_REDIS_CLUSTER": "true", "TOKENFAN_QUEUE_REDIS_URL": seed.url}
    )
    store = Store.from_settings(settings)
    try:
        await store.topology.ready()
        yield store
    finally:
        await store.close()


async def generation(api: httpx.AsyncClient, session_id: str, generation_id: str) -> dict[str, Any]:
    """The generation as its session's view shows it: read from the session's own node (a generation's
    own route first looks its session up under the generation id, which may hash to the hung primary)."""
    response = await api.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    (record,) = (g for g in response.json()["generations"] if g["generation_id"] == generation_id)
    found: dict[str, Any] = record
    return found


async def test_a_hung_primary_holds_up_its_own_sessions_and_the_others_finish_unrestarted(
    cluster: EmbeddedCluster, hstack: RunningStack, hapi: httpx.AsyncClient, opened: Closer
) -> None:
    hung, other = cluster.primaries
    held_body = user_message("held", {"tokens": 300, "rate": 50})
    flowing_body = user_message("flowing", {"tokens": 300, "rate": 50})  # 6 s: leases of 1.5 s, renewed
    held_session, flowing_session = new_session_id_on(cluster, hung), new_session_id_on(cluster, other)
    held = await accept(hapi, held_session, held_body)
    flowing = await accept(hapi, flowing_session, flowing_body)

    async def both_streaming() -> bool:
        records = [
            await generation(hapi, held_session, held),
            await generation(hapi, flowing_session, flowing),
        ]
        return all(record["text"] for record in records)

    await wait_for_condition(both_streaming)
    # Another worker, its slot map learnt while every node answers (a client learning it later waits for the
    # hung node too).
    async with cluster_store(other) as other_worker:
        watchers = {  # the relay claims both sessions: they are watched
            generation_id: await opened(Watcher(hstack.relay_url, session_id)).connect()
            for session_id, generation_id in ((held_session, held), (flowing_session, flowing))
        }

        async def both_watched() -> bool:
            return await other_worker.watched([held_session, flowing_session]) == [True, True]

        await wait_for_condition(both_watched)
        hung.pause()
        try:
            streamed = len((await generation(hapi, flowing_session, flowing))["text"])
            full = len(expected_text(flowing_body))

            async def two_leases_later() -> bool:  # 150 tokens at 50/s: 3 s, two leases of 1.5 s
                record = await generation(hapi, flowing_session, flowing)
                return len(record["text"]) >= streamed + full // 2 or record["status"] != "running"

            await wait_for_condition(two_leases_later, timeout=30)
            # What any other worker given its job would do now: its lease is live, so it is not taken over.
            start = await other_worker.start(flowing_session, flowing)
            assert start.outcome is StartOutcome.BUSY, start
            # And the relay's claim on its session is renewed: it is still watched (claims last 1.5 s).
            assert await other_worker.watched([flowing_session]) == [True]

            async def flowing_done() -> bool:
                return bool((await generation(hapi, flowing_session, flowing))["status"] != "running")

            await wait_for_condition(flowing_done, timeout=30)
            record = await generation(hapi, flowing_session, flowing)
            assert (record["status"], record["text"]) == ("completed", expected_text(flowing_body))
            assert record["attempt"] == 1
        finally:
            hung.resume()

    async def held_done() -> bool:
        return bool((await generation(hapi, held_session, held))["status"] != "running")

    await wait_for_condition(held_done, timeout=60)
    record = await generation(hapi, held_session, held)
    assert (record["status"], record["text"]) == ("completed", expected_text(held_body))
    for generation_id, body in (
        (held, held_body),
        (flowing, flowing_body),
    ):  # and their subscribers saw it all
        watcher = watchers[generation_id]
        await watcher.receive_until(finished(generation_id))
        assert watcher.transcript().generations[generation_id].text == expected_text(body)
