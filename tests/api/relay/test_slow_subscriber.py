"""A subscriber that stops reading: the relay's memory for it stays bounded, it recovers without a gap once it
reads again (a `snapshot` frame, or close 4008 and a resume), and the other subscribers never notice.

The generation and the stalled socket are `tests.support.slow`'s (its docstring says why they are shaped
so). tests/api/http/test_sse.py stalls an SSE client the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from tests.support.delivery import assert_exact_delivery, coverage, transcript_of
from tests.support.requests import expected_text
from tests.support.slow import (
    LIMIT,
    flood,
    flood_while_stalled,
)
from tests.support.stack import RunningStack, start_frontends
from tests.support.waiting import Closer
from tests.support.watchers import Watcher
from tokenfan.contract.events import GenerationStatus

pytestmark = pytest.mark.fault

#: What the relay may hold for one connection that does not read: the limit plus one batch of live frames
#: (beyond the limit it stops queueing frames for it); generously, four times the limit.
BOUND = 4 * LIMIT


@pytest.fixture(scope="module")
def snapshot_relay(stack: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(stack, {"TOKENFAN_RELAY_MAX_BUFFER_BYTES": str(LIMIT)}, api=False)
    yield front
    front.stop()


@pytest.fixture(scope="module")
def closing_relay(stack: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(
        stack,
        {"TOKENFAN_RELAY_MAX_BUFFER_BYTES": str(LIMIT), "TOKENFAN_RELAY_SLOW_POLICY": "close"},
        api=False,
    )
    yield front
    front.stop()


async def assert_fast_subscriber_unharmed(
    redis: Redis, session_id: str, fast: Watcher, generation_id: str, body: dict[str, Any]
) -> None:
    generation = fast.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    await assert_exact_delivery(redis, session_id, fast.frames)
    # The generation made far more than the relay may hold for the stalled subscriber.
    assert sum(len(json.dumps(frame)) for frame in fast.frames) > 3 * BOUND


def assert_assembles_exactly(frames: list[dict[str, Any]], generation_id: str, body: dict[str, Any]) -> None:
    generation = transcript_of(frames).generations[generation_id]  # raises on offsets or seqs that skip
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)


async def test_a_stalled_subscriber_is_bounded_then_recovers_from_a_snapshot(
    opened: Closer,
    stack: RunningStack,
    snapshot_relay: RunningStack,
    api: httpx.AsyncClient,
    redis: Redis,
    session_id: str,
) -> None:
    body = flood("flood the snapshot relay")
    fast, joined_at, stalled, generation_id, buffers = await flood_while_stalled(
        opened, snapshot_relay.relay_url, api, session_id, body
    )
    await assert_fast_subscriber_unharmed(redis, session_id, fast, generation_id, body)

    received: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while not received or received[-1]["offset"] != fast.frames[-1]["offset"]:
            received.append(json.loads(await stalled.recv()))
    kinds = [frame["type"] for frame in received]
    assert kinds.count("snapshot") == 1, "exactly one snapshot frame replaces the skipped backlog"
    snapshot = received[kinds.index("snapshot")]
    assert snapshot["reason"] == "slow_consumer"
    assert snapshot["session_id"] == session_id
    assert [view["generation_id"] for view in snapshot["generations"]] == [generation_id]
    assert kinds.index("snapshot") > 0, "the frames buffered before it was found slow come first"
    # The backlog was skipped, not sent.
    assert len(coverage(received)) < len(coverage(fast.frames[joined_at:]))
    assert_assembles_exactly(fast.frames[:joined_at] + received, generation_id, body)
    assert max(buffers) <= BOUND, f"the relay held {max(buffers)} bytes for one stalled connection"


async def test_a_stalled_subscriber_is_closed_with_4008_and_resumes_exactly(
    opened: Closer,
    stack: RunningStack,
    closing_relay: RunningStack,
    api: httpx.AsyncClient,
    redis: Redis,
    session_id: str,
) -> None:
    body = flood("flood the closing relay")
    fast, joined_at, stalled, generation_id, buffers = await flood_while_stalled(
        opened, closing_relay.relay_url, api, session_id, body
    )
    await assert_fast_subscriber_unharmed(redis, session_id, fast, generation_id, body)
    assert max(buffers) <= BOUND, f"the relay held {max(buffers)} bytes for one stalled connection"

    received: list[dict[str, Any]] = []

    async def read_until_closed() -> None:
        while True:
            received.append(json.loads(await stalled.recv()))

    async with asyncio.timeout(20):
        with pytest.raises(ConnectionClosed) as closed:
            await read_until_closed()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4008
    assert received, "the frames buffered before it was found slow still arrive"
    assert received[-1]["offset"] != fast.frames[-1]["offset"], "it was closed before the end"
    assert "snapshot" not in {frame["type"] for frame in received}

    resumed = await opened(Watcher(closing_relay.relay_url, session_id)).connect(after=received[-1]["offset"])
    end = fast.frames[-1]["offset"]
    await resumed.receive_until(lambda got: bool(got) and got[-1]["offset"] == end)
    frames = fast.frames[:joined_at] + received + resumed.frames
    assert_assembles_exactly(frames, generation_id, body)
    await assert_exact_delivery(redis, session_id, frames)
