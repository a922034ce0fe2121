"""Every log line of a generation's life names it: ``session_id`` and ``generation_id`` on each line the API
and the worker write for it, and ``job_id`` too on the worker's.

Fresh processes of its own (on a Redis database of its own, so that no other worker takes its jobs), whose
every line after start-up belongs to the generations this test makes: two in one session (the second waits
behind the first, then is handed over), and one whose upstream refuses it once before it runs (a retry).
Completion is seen on the relay, whose lines are not a generation's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.requests import accept, new_session_id, user_message
from tests.support.stack import RunningStack
from tests.support.waiting import wait_for_condition
from tests.support.watchers import Watcher, finished
from tokenfan.cli.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="module")
def logged(redis_server: EmbeddedRedis) -> Iterator[RunningStack]:
    with RunningStack(redis_url=redis_server.url.removesuffix("/0") + "/6").start() as stack:
        yield stack


@pytest.fixture
async def lapi(logged: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with logged.api_client() as client:
        yield client


def lines_after(path: Path, started: str) -> list[dict[str, Any]]:
    """The JSON lines of a process's log after the line whose event is `started`."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    (start,) = [index for index, line in enumerate(lines) if line["event"] == started]
    return lines[start + 1 :]


async def test_every_line_of_a_generations_life_names_its_session_and_generation_and_job(
    logged: RunningStack, lapi: httpx.AsyncClient
) -> None:
    first_session, second_session = new_session_id(), new_session_id()
    watchers = [await Watcher(logged.relay_url, s).connect() for s in (first_session, second_session)]
    try:
        slow = await accept(lapi, first_session, user_message("first", {"tokens": 60, "rate": 200}))
        behind = await accept(lapi, first_session, user_message("second, behind it"))
        directive = {"status": 503, "times": 1, "retry_after": 0, "key": second_session}
        retried = await accept(lapi, second_session, user_message("refused once", directive))
        await watchers[0].receive_until(finished(slow, behind))
        await watchers[1].receive_until(finished(retried))
    finally:
        for watcher in watchers:
            await watcher.close()
    worker_log = next(logged.logs.glob("worker-*.log"))

    async def all_finished() -> bool:  # the terminal event is durable before its line is written
        return worker_log.read_text().count('"generation_finished"') == 3

    await wait_for_condition(all_finished, timeout=10)

    api_lines = lines_after(logged.logs / "api.log", "Application startup complete.")
    worker_lines = lines_after(worker_log, "worker_ready")
    for line in api_lines + worker_lines:
        assert line.get("session_id") in (first_session, second_session), line
        assert line.get("generation_id") in (slow, behind, retried), line
    for line in worker_lines:
        assert line.get("job_id") == line["generation_id"], line
    events = {line["event"] for line in api_lines + worker_lines}
    assert {"generation_accepted", "http_request", "generation_started", "upstream_retry"} <= events
    assert {line["generation_id"] for line in worker_lines if line["event"] == "generation_finished"} == {
        slow,
        behind,
        retried,
    }
