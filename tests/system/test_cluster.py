"""On a Redis Cluster, faults included: sessions spread over the primaries, a worker killed mid-generation,
and a primary killed with SIGKILL mid-generation while subscribers on two relays watch.

A cluster of its own (three primaries with a replica each, one-second node timeout), with the job queue on a
plain Redis, two workers, two relays and a short lease. The primary is killed last: the cluster goes on
with one shard fewer replica.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.requests import accept, expected_text, new_session_id, user_message
from tests.support.stack import RunningStack, clean_environment, start_frontends
from tests.support.watchers import Watcher, close_reason, finished, http_url, stream_url
from tokenfan.cli.embedded_cluster import EmbeddedCluster, command
from tokenfan.cli.embedded_redis import EmbeddedRedis, free_port
from tokenfan.client import SessionStream, Transcript
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.keys import SessionKeys
from tokenfan.store.slots import slot_of

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3, replicas=1) as running:
        yield running


@pytest.fixture(scope="module")
def cstack(cluster: EmbeddedCluster, queue: EmbeddedRedis) -> Iterator[RunningStack]:
    extra_env = {"TOKENFAN_LEASE_SECONDS": "1.5", "TOKENFAN_FEED_LINGER_SECONDS": "0.1"}
    stack = RunningStack(redis_url=cluster.url, queue_url=queue.url, extra_env=extra_env)
    with stack.start(workers=2, relays=2):
        yield stack


@pytest.fixture
async def capi(cstack: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with cstack.api_client() as client:
        yield client


def sharded_subscribers(cluster: EmbeddedCluster, node: EmbeddedRedis) -> int:
    """Connections to `node` holding sharded subscriptions (CLIENT LIST's ``ssub``)."""
    clients = str(command(cluster.host, node.port, "CLIENT", "LIST")).splitlines()
    return sum(1 for line in clients if "ssub=" in line and "ssub=0" not in line)


async def test_sessions_spread_over_the_primaries_and_each_relay_needs_one_connection_per_shard(
    cluster: EmbeddedCluster, cstack: RunningStack, capi: httpx.AsyncClient
) -> None:
    sessions = [new_session_id() for _ in range(12)]
    owners = {cluster.primary_of_slot(slot_of(session)).port for session in sessions}
    assert len(owners) >= 2, "twelve random sessions should land on more than one primary"
    body = user_message("spread out", {"tokens": 200, "rate": 100})
    watchers = [
        await Watcher(cstack.relay_urls[i % 2], session).connect() for i, session in enumerate(sessions)
    ]
    generations = [await accept(capi, session, body) for session in sessions]
    await asyncio.gather(
        *(w.receive_until(lambda f: len(f) >= 3) for w in watchers)  # every one is live now
    )
    # Twelve sessions watched through two relays: at most one sharded connection per relay per primary.
    for primary in cluster.primaries:
        assert sharded_subscribers(cluster, primary) <= 2
    for watcher, generation_id in zip(watchers, generations, strict=True):
        await watcher.receive_until(finished(generation_id))
        assert watcher.transcript().generations[generation_id].text == expected_text(body)
        await watcher.close()


async def test_a_worker_killed_mid_generation_is_restarted_on_the_cluster(
    cstack: RunningStack, capi: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    body = user_message("crash on a cluster", {"tokens": 150, "rate": 100})
    watchers = [await Watcher(url, session_id).connect() for url in cstack.relay_urls]
    generation_id = await accept(capi, session_id, body)
    await watchers[0].receive_until(lambda frames: sum(f["type"] == "delta" for f in frames) >= 3)
    for worker in [child for child in cstack.children if child.role == "worker" and child.alive()]:
        worker.kill()  # whichever runs it; the other is killed too, to know that a new one restarts it
    cstack.spawn("worker").wait_ready()
    for watcher in watchers:
        await watcher.receive_until(finished(generation_id), timeout=30)
        generation = watcher.transcript().generations[generation_id]
        assert generation.status is GenerationStatus.COMPLETED
        assert generation.restarts == 1
        assert generation.text == expected_text(body)
        await watcher.close()


class Follower:
    """A resuming subscriber (rebuilding from a snapshot when told to) that assembles one generation."""

    def __init__(self, relay_url: str, api_url: str, session_id: str, generation_id: str) -> None:
        self.stream = SessionStream(relay_url, session_id, api_url=api_url)
        self.generation_id = generation_id
        self.transcript = Transcript()
        self.kinds: list[str] = []
        self.progress = asyncio.Condition()
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for frame in self.stream:
            self.transcript.apply(frame)
            self.kinds.append(frame["type"])
            async with self.progress:
                self.progress.notify_all()
            generation = self.transcript.generations.get(self.generation_id)
            if generation is not None and generation.status.is_terminal:
                return

    async def frames(self, count: int) -> None:
        """Until `count` frames were received."""
        async with asyncio.timeout(20), self.progress:
            await self.progress.wait_for(lambda: len(self.kinds) >= count)

    @property
    def text(self) -> str:
        return self.transcript.generations[self.generation_id].text

    @property
    def status(self) -> str:
        return self.transcript.generations[self.generation_id].status.value


async def test_writes_lost_in_a_failover_are_written_again_and_subscribers_rebuild(
    cluster: EmbeddedCluster, cstack: RunningStack, capi: httpx.AsyncClient
) -> None:
    """What a failover to a replica that had not received the last writes leaves: the session's state as
    of an earlier instant. Here the very state of that instant is put back (DUMP, then RESTORE) while the
    generation runs, after subscribers saw what came later. The worker writes the lost events again, the
    relays see the broken chain and tell their subscribers to rebuild (4410), and every subscriber ends
    with exactly the stored text: no word lost, none twice."""
    session_id = new_session_id()
    body = user_message("lost and found", {"tokens": 300, "rate": 100})
    generation_id = await accept(capi, session_id, body)
    followers = [Follower(url, cstack.api_url, session_id, generation_id) for url in cstack.relay_urls]
    await followers[0].frames(10)
    keys = SessionKeys(session_id)
    names = [keys.events, keys.meta, keys.generation(generation_id), keys.generation_text(generation_id)]
    # A replica holds a prefix of its primary's writes, each script's whole or not at all: one instant of
    # all the session's keys. Dumped or restored one key at a time while the worker writes, they would mix
    # instants (a text holding a delta its stream and seq do not) that no failover can leave. So both go
    # in one MULTI/EXEC on the node holding the session's slot (its keys share a hash tag).
    async with Redis.from_url(cluster.primary_of_slot(slot_of(session_id)).url) as node:
        async with node.pipeline(transaction=True) as dumping:
            for name in names:
                dumping.dump(name)
            earlier: list[bytes | None] = await dumping.execute()
        await followers[0].frames(len(followers[0].kinds) + 15)  # seen by subscribers, then lost
        async with node.pipeline(transaction=True) as restoring:
            for name, value in zip(names, earlier, strict=True):
                assert value is not None
                restoring.restore(name, 0, value, replace=True)
            await restoring.execute()
    async with asyncio.timeout(60):
        await asyncio.gather(*(follower.task for follower in followers))
    final: dict[str, Any] = (await capi.get(f"/v1/generations/{generation_id}")).json()
    assert (final["status"], final["text"]) == ("completed", expected_text(body))
    for follower in followers:
        assert (follower.status, follower.text) == ("completed", final["text"])
        assert "snapshot" in follower.kinds  # told of the loss, it rebuilt; never a silent gap


async def test_a_primary_killed_mid_generation_is_replaced_and_its_subscribers_end_exactly(
    cluster: EmbeddedCluster, cstack: RunningStack, capi: httpx.AsyncClient
) -> None:
    """SIGKILL of the primary holding the session, while subscribers on both relays watch: its replica
    takes over, the worker's writes, the relays' live tails and the subscribers find it by themselves,
    and every subscriber ends with exactly the text the API reports."""
    session_id = new_session_id()
    body = user_message("through a failover", {"tokens": 500, "rate": 100})
    generation_id = await accept(capi, session_id, body)
    followers = [Follower(url, cstack.api_url, session_id, generation_id) for url in cstack.relay_urls]
    await followers[0].frames(20)
    running = [child for child in cstack.children if child.alive()]
    cluster.primary_of_slot(slot_of(session_id)).kill()
    async with asyncio.timeout(60):
        await asyncio.gather(*(follower.task for follower in followers))
    final: dict[str, Any] = (await capi.get(f"/v1/generations/{generation_id}")).json()
    assert (final["status"], final["text"]) == ("completed", expected_text(body))
    for follower in followers:
        assert (follower.status, follower.text) == ("completed", final["text"])
    assert all(child.alive() for child in running)  # no process needed a restart


def start_up_error(env: dict[str, str], role: str) -> str:
    """Run `tokenfan ROLE` expecting it to refuse to start; the last line of its standard error."""
    done = subprocess.run(
        [sys.executable, "-m", "tokenfan", role, *(["--port", "0"] if role != "worker" else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("role", ["api", "relay", "worker"])
def test_a_misconfigured_cluster_is_one_line_at_start_up(
    role: str, cluster: EmbeddedCluster, queue: EmbeddedRedis
) -> None:
    base = {**clean_environment(), "TOKENFAN_INSECURE_DEV_MODE": "true", "TOKENFAN_LOG_FORMAT": "json"}
    not_a_cluster = start_up_error(
        {
            **base,
            "REDIS_URL": queue.url,
            "TOKENFAN_REDIS_CLUSTER": "true",
            "TOKENFAN_QUEUE_REDIS_URL": queue.url,
        },
        role,
    )
    assert (
        not_a_cluster == f"tokenfan {role}: TOKENFAN_REDIS_CLUSTER=true, but REDIS_URL is not a cluster node"
    )
    # A primary alive now: an earlier test kills the primary of a random session's slot.
    a_cluster = start_up_error({**base, "REDIS_URL": cluster.primary_of_slot(0).url}, role)
    assert a_cluster == f"tokenfan {role}: REDIS_URL is a Redis Cluster node: set TOKENFAN_REDIS_CLUSTER=true"
    no_queue = start_up_error({**base, "REDIS_URL": cluster.url, "TOKENFAN_REDIS_CLUSTER": "true"}, role)
    assert no_queue.startswith(f"tokenfan {role}: TOKENFAN_REDIS_CLUSTER=true needs TOKENFAN_QUEUE_REDIS_URL")


async def test_an_unreachable_cluster_is_503_and_1013_while_it_lasts(
    cstack: RunningStack, queue: EmbeddedRedis
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()},redis://127.0.0.1:{free_port()}"
    front = start_frontends(
        cstack,
        {"REDIS_URL": nowhere, "TOKENFAN_REDIS_CLUSTER": "true", "TOKENFAN_QUEUE_REDIS_URL": queue.url},
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            posted = await client.post(
                f"{front.api_url}/v1/sessions/{new_session_id()}/generations", json=user_message("hello?")
            )
            assert posted.status_code == 503
            assert posted.json()["error"]["code"] == "unavailable"
            assert posted.headers["Retry-After"] == "1"
            assert (await client.get(f"{front.api_url}/readyz")).status_code == 503
            assert (await client.get(f"{http_url(front.relay_url)}/readyz")).status_code == 503
        code, _ = await close_reason(stream_url(front.relay_url, new_session_id()), timeout=30)
        assert code == 1013
        assert all(child.alive() for child in front.children)  # nothing crashed: it waits for Redis
    finally:
        front.stop()
