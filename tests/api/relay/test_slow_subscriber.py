"""A subscriber that stops reading: the relay's memory for it stays bounded, it recovers without a gap once it
reads again (a `snapshot` frame, or close 4008 and a resume), and the other subscribers never notice.

The generation and the stalled socket are `tests.support.slow`'s (its docstring says why they are shaped
so). tests/api/http/test_sse.py stalls an SSE client the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.delivery import assert_exact_delivery, coverage, transcript_of
from tests.support.requests import accept, expected_text
from tests.support.slow import HEAD, LIMIT, content_length, flood, slow_socket
from tests.support.stack import RunningStack, start_frontends
from tests.support.waiting import Closer, wait_for_condition
from tests.support.watchers import Watcher, finished, http_url, stream_url
from tokenfan.contract.events import GenerationStatus

pytestmark = pytest.mark.fault

#: What the relay may hold for one connection that does not read: the limit plus one batch of live frames
#: (beyond the limit it stops queueing frames for it); generously, four times the limit.
BOUND = 4 * LIMIT


@pytest.fixture
async def opened() -> AsyncIterator[Closer]:
    """Registers clients to close at the end of the test, passed or failed."""
    closer = Closer()
    yield closer
    await closer.close_all()


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


async def stalled_subscriber(opened: Closer, relay_url: str, session_id: str, after: str) -> ClientConnection:
    """A subscriber resuming after `after` that reads nothing from its socket until its transport's
    `resume_reading()`, on a `slow_socket` so that TCP back-pressure reaches the relay quickly."""
    sock = await slow_socket(relay_url)
    try:
        connection = await connect(
            stream_url(relay_url, session_id, after),
            sock=sock,
            max_queue=1,
            max_size=None,
            compression=None,
            ping_interval=None,  # while stalled it would not read the pong
            close_timeout=1,  # it may hold unread frames when a failed test closes it
        )
    except BaseException:
        sock.close()
        raise
    # Stop reading the socket outright: a one-message queue alone would still let the client library pull
    # in the rest of a large frame it has begun, draining the relay's buffer behind the test's back.
    connection.transport.pause_reading()
    return opened(connection)


async def largest_buffers_until(relay_url: str, done: asyncio.Event) -> list[int]:
    """Every `largest_write_buffer_bytes` the relay reports until `done`, and once more after it."""
    seen: list[int] = []
    async with httpx.AsyncClient(base_url=http_url(relay_url), timeout=10) as client:
        while True:
            finished_before = done.is_set()
            seen.append((await client.get("/stats")).json()["largest_write_buffer_bytes"])
            if finished_before:
                return seen
            await asyncio.sleep(0.01)  # paces the sampling; nothing waits on it


async def flood_while_stalled(
    opened: Closer, relay_url: str, api: httpx.AsyncClient, session_id: str, body: dict[str, Any]
) -> tuple[Watcher, int, ClientConnection, str, list[int]]:
    """A fast subscriber throughout, and a stalled one that joins after the generation's first piece; the
    generation runs to its end. Returns the fast one, how many of its frames precede the stalled one's
    position, the stalled one, the generation, and the relay's largest write buffer, sampled all through
    the stall."""
    fast = await opened(Watcher(relay_url, session_id)).connect()
    generation_id = await accept(api, session_id, body)
    await fast.receive_until(lambda frames: content_length(frames) >= HEAD)
    joined_at = len(fast.frames)
    stalled = await stalled_subscriber(opened, relay_url, session_id, after=fast.frames[-1]["offset"])
    done = asyncio.Event()
    sampler = asyncio.create_task(largest_buffers_until(relay_url, done))
    try:
        async with httpx.AsyncClient(base_url=http_url(relay_url), timeout=10) as client:

            async def both_live() -> bool:
                return int((await client.get("/stats")).json()["subscribers"]) == 2

            # It caught up (a few tiny frames) and joined the session's feed before the flood began.
            await wait_for_condition(both_live, timeout=5, interval=0.005)
        await fast.receive_until(finished(generation_id), timeout=30)
    finally:
        done.set()
        buffers = await sampler
    stalled.transport.resume_reading()
    return fast, joined_at, stalled, generation_id, buffers


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
