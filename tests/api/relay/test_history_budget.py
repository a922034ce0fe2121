"""A relay whose catch-up history budget is tiny, seen from real WebSocket clients: many of them resuming at
once, in several sessions and at many offsets, each still gets exactly what followed its offset
(tests/api/live/test_history_budget.py checks the budget's accounting under the same kind of storm)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.delivery import Coverage, coverage, stream_contents
from tests.support.requests import accept, new_session_id, user_message
from tests.support.stack import RunningStack, start_frontends
from tests.support.waiting import Closer
from tests.support.watchers import Watcher, finished

#: Room for a few entries: most resumers read pages of their own, some are served from a history.
BUDGET = 4_000


@pytest.fixture(scope="module")
def budget_relay(stack: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(
        stack,
        {"TOKENFAN_CATCHUP_HISTORY_BUDGET": str(BUDGET), "TOKENFAN_RELAY_CATCHUP_PAGE_SIZE": "4"},
        api=False,
    )
    yield front
    front.stop()


async def completed(relay_url: str, api: httpx.AsyncClient, session_id: str) -> None:
    watcher = await Watcher(relay_url, session_id).connect()
    try:
        await watcher.receive_until(finished(await accept(api, session_id, user_message("resume me"))))
    finally:
        await watcher.close()


async def test_many_resumers_of_many_sessions_at_once_each_get_exactly_what_follows(
    opened: Closer, stack: RunningStack, budget_relay: RunningStack, api: httpx.AsyncClient, redis: Redis
) -> None:
    sessions = [new_session_id() for _ in range(4)]
    streams: dict[str, tuple[list[str], Coverage]] = {}
    for session_id in sessions:
        await completed(stack.relay_url, api, session_id)
        streams[session_id] = await stream_contents(redis, session_id)
    resumes = [
        (session_id, cut)
        for session_id, (offsets, _) in streams.items()
        for cut in range(0, len(offsets) - 1, 3)
    ]

    async def resume(session_id: str, cut: int) -> Watcher:
        offsets = streams[session_id][0]
        watcher = await opened(Watcher(budget_relay.relay_url, session_id)).connect(after=offsets[cut])
        await watcher.receive_until(lambda got: bool(got) and got[-1]["offset"] == offsets[-1])
        return watcher

    watchers = await asyncio.gather(*(resume(session_id, cut) for session_id, cut in resumes))
    for (session_id, cut), watcher in zip(resumes, watchers, strict=True):
        assert coverage(watcher.frames) == streams[session_id][1][cut + 1 :]
