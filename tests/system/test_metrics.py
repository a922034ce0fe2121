"""Every process's ``GET /metrics``, scraped after real traffic: the numbers, not only the names.

One stack of its own (simulator, relay, API and a worker, each serving its metrics on a free port), on a
Redis database of its own (the numbers must be this worker's alone: no other worker may take its jobs), with
a short lease so that a killed worker's generation restarts within seconds, and fast presence claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.support.requests import SIMULATOR, accept, new_session_id, user_message
from tests.support.scraping import scrape, value, wait_for_value
from tests.support.slow import LIMIT, flood, flood_while_stalled
from tests.support.sse import SseWatcher
from tests.support.stack import RunningStack, start_frontends
from tests.support.waiting import Closer, wait_for_condition
from tests.support.watchers import Watcher, finished
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.cli.processes import ChildProcess
from tokenfan.cli.simulator import reply_chunks
from tokenfan.store import Store, redis_client

FINISHED = "tokenfan_worker_generations_finished_total"
ROUTE = "/v1/sessions/{session_id}/generations"


@pytest.fixture(scope="module")
def metered(redis_server: EmbeddedRedis) -> Iterator[RunningStack]:
    stack = RunningStack(
        redis_url=redis_server.url.removesuffix("/0") + "/5",
        extra_env={
            "TOKENFAN_METRICS_PORT": "0",
            "TOKENFAN_LEASE_SECONDS": "1.5",
            "TOKENFAN_PRESENCE_INTERVAL_SECONDS": "0.2",
            "TOKENFAN_FEED_LINGER_SECONDS": "0.1",
        },
    )
    with stack.start():
        yield stack


@pytest.fixture
async def mapi(metered: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with metered.api_client() as client:
        yield client


def process(stack: RunningStack, role: str) -> ChildProcess:
    (child,) = [child for child in stack.children if child.role == role and child.alive()]
    return child


async def ended(api: httpx.AsyncClient, generation_id: str) -> None:
    async def terminal() -> bool:
        status = (await api.get(f"/v1/generations/{generation_id}")).json()["status"]
        return status in ("completed", "failed", "cancelled")

    await wait_for_condition(terminal, timeout=30)


async def test_each_process_serves_prometheus_text_with_process_metrics_and_what_it_is(
    metered: RunningStack,
) -> None:
    for role in ("api", "relay", "worker"):
        child = process(metered, role)
        assert child.metrics_url.startswith("http://127.0.0.1:"), "bound like the process"
        scraped = await scrape(child.metrics_url)
        assert scraped.component == role
        assert scraped.value("process_resident_memory_bytes") > 0
        assert scraped.value("process_open_fds") > 0
        async with httpx.AsyncClient() as client:
            assert (await client.get(child.metrics_url.replace("/metrics", "/other"))).status_code == 404


async def test_generations_move_the_worker_and_api_counters_by_exactly_their_number(
    metered: RunningStack, mapi: httpx.AsyncClient
) -> None:
    worker, api = process(metered, "worker").metrics_url, process(metered, "api").metrics_url
    before, api_before = await scrape(worker), await scrape(api)
    tag = new_session_id()
    completing = [user_message(f"count me {n}") for n in range(4)]
    retried = user_message("once refused", {"status": 503, "times": 1, "retry_after": 0, "key": tag})
    rejected = user_message("always refused", {"status": 400, "key": tag + "-400"})
    bodies = [*completing, retried, rejected]
    generations = [await accept(mapi, new_session_id(), body) for body in bodies]
    await asyncio.gather(*(ended(mapi, generation_id) for generation_id in generations))

    await wait_for_value(worker, FINISHED, before.value(FINISHED) + 6)
    after = await scrape(worker)

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert grew(FINISHED, outcome="completed", reason="stop") == 5
    assert grew(FINISHED, outcome="failed", reason="upstream_rejected") == 1
    assert grew("tokenfan_worker_upstream_retries_total", cause="upstream_unavailable") == 1
    assert grew("tokenfan_worker_generations_started_total") == 6
    assert grew("tokenfan_worker_queue_wait_seconds_count") == 6
    # Five generations produced tokens; the rejected one none.
    assert grew("tokenfan_worker_time_to_first_token_seconds_count") == 5
    tokens = sum(len(list(reply_chunks(body, SIMULATOR))) for body in [*completing, retried])
    assert grew("tokenfan_worker_tokens_total") == tokens
    assert grew("tokenfan_worker_inter_token_gap_seconds_count") == tokens - 5
    # One write carries the events of every generation that has some at that moment (concurrent generations
    # share writes, however many): each of the six is in at least one, however few writes they took.
    assert grew("tokenfan_worker_redis_write_seconds_count") >= 1
    assert grew("tokenfan_worker_flush_generations_sum") >= 6
    assert after.value("tokenfan_worker_generations_running") == 0

    api_after = await scrape(api)
    posted = {"route": ROUTE, "method": "POST", "status": "202"}
    assert (
        api_after.value("tokenfan_api_requests_total", **posted)
        - api_before.value("tokenfan_api_requests_total", **posted)
        == 6
    )
    assert (
        api_after.value("tokenfan_api_enqueue_seconds_count")
        - api_before.value("tokenfan_api_enqueue_seconds_count")
        == 6
    )
    routes = {
        dict(series)["route"]
        for metric, series in api_after.samples
        if metric == "tokenfan_api_requests_total"
    }
    assert not any(tag in route for route in routes), "a route label is the template, never the raw path"


SUBSCRIPTIONS = "tokenfan_live_subscriptions"


async def test_k_open_subscribers_show_as_k_in_the_gauges_in_redis_and_in_top(
    metered: RunningStack, opened: Closer
) -> None:
    relay, api = process(metered, "relay").metrics_url, process(metered, "api").metrics_url
    websockets = await value(relay, SUBSCRIPTIONS, transport="websocket")
    connections = await value(relay, "tokenfan_relay_connections")
    sse = await value(api, SUBSCRIPTIONS, transport="sse")
    session_id = new_session_id()
    for _ in range(7):
        await opened(Watcher(metered.relay_url, session_id)).connect()
    for _ in range(2):
        await opened(SseWatcher(metered.api_url, session_id)).connect()

    await wait_for_value(relay, SUBSCRIPTIONS, websockets + 7, transport="websocket")
    assert await value(relay, "tokenfan_relay_connections") == connections + 7
    await wait_for_value(api, SUBSCRIPTIONS, sse + 2, transport="sse")
    assert await value(api, "tokenfan_api_sse_streams") >= 2

    store = Store(redis_client(metered.redis_url), session_ttl_seconds=60, stream_max_length=100)
    try:

        async def claimed() -> bool:  # the relay's and the API's claims, each with its own count
            return (session_id, 9, 2) in await store.busiest(10_000)

        await wait_for_condition(claimed, timeout=10)
    finally:
        await store.close()
    shown = await top(metered, [relay, api])
    rows = [line for line in shown.splitlines() if session_id in line]
    assert rows, shown
    assert rows[-1].endswith("9 subscribers on 2 processes"), shown
    assert f"websocket {websockets + 7:.0f}" in shown, shown

    await opened.close_all()
    await wait_for_value(relay, SUBSCRIPTIONS, websockets, transport="websocket")
    await wait_for_value(api, SUBSCRIPTIONS, sse, transport="sse")


async def top(stack: RunningStack, urls: list[str]) -> str:
    """What `tokenfan top` prints: two frames, a short interval apart (its own pace, nothing waits on it)."""
    command = [sys.executable, "-m", "tokenfan", "top", "--metrics", ",".join(urls)]
    process = await asyncio.create_subprocess_exec(
        *command, "--iterations", "2", "--interval", "0.2", "--sessions", "50",
        env=stack.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.fault
async def test_a_killed_workers_generation_shows_up_as_a_restart_on_its_successor(
    metered: RunningStack, mapi: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    watcher = await Watcher(metered.relay_url, session_id).connect()
    try:
        generation_id = await accept(mapi, session_id, user_message("survive", {"tokens": 150, "rate": 100}))
        await watcher.receive_until(lambda frames: sum(f["type"] == "delta" for f in frames) >= 3)
        process(metered, "worker").kill()
        successor = metered.spawn("worker")
        successor.wait_ready()
        await watcher.receive_until(finished(generation_id))
    finally:
        await watcher.close()
    url = successor.metrics_url
    await wait_for_value(url, FINISHED, 1, outcome="completed")
    after = await scrape(url)
    assert after.value("tokenfan_worker_generation_restarts_total") == 1
    assert after.value("tokenfan_worker_generations_started_total") == 1
    assert after.value("tokenfan_worker_queue_wait_seconds_count") == 0, "a restart did not wait in the queue"
    assert after.value("tokenfan_worker_time_to_first_token_seconds_count") == 1


@pytest.fixture(scope="module")
def closing_relay(metered: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(
        metered,
        {
            "TOKENFAN_METRICS_PORT": "0",
            "TOKENFAN_RELAY_MAX_BUFFER_BYTES": str(LIMIT),
            "TOKENFAN_RELAY_SLOW_POLICY": "close",
        },
        api=False,
    )
    yield front
    front.stop()


@pytest.mark.fault
async def test_a_slow_subscriber_counts_once_as_slow_and_its_4008_as_sent(
    metered: RunningStack,
    closing_relay: RunningStack,
    mapi: httpx.AsyncClient,
    opened: Closer,
    redis_server: EmbeddedRedis,
) -> None:
    url = process(closing_relay, "relay").metrics_url
    assert await value(url, "tokenfan_live_slow_consumers_total") == 0
    _, _, stalled, _, _ = await flood_while_stalled(
        opened, closing_relay.relay_url, mapi, new_session_id(), flood("flood, metered")
    )
    with contextlib.suppress(ConnectionClosed):  # read what is left, and the close
        async with asyncio.timeout(20):
            while True:
                await stalled.recv()
    await wait_for_value(url, "tokenfan_relay_closes_total", 1, code="4008")
    after = await scrape(url)
    assert after.value("tokenfan_live_slow_consumers_total", policy="close") == 1
    assert after.value("tokenfan_live_slow_consumers_total", policy="snapshot") == 0
    assert after.value("tokenfan_live_subscriptions_ended_total", code="4008") == 1
    assert after.value("tokenfan_live_frames_sent_total", phase="live") > 0
    assert after.value("tokenfan_live_fanout_lag_seconds_count") > 0
