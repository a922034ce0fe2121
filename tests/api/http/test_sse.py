"""Server-Sent Events (``GET /v1/sessions/{id}/events``) seen from a real HTTP client parsing the stream."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.delivery import assert_exact_delivery, coverage, transcript_of
from tests.support.requests import accept, expected_text, user_message
from tests.support.slow import HEAD, LIMIT, content_length, flood
from tests.support.sse import SseBlock, SseWatcher, StalledSseReader
from tests.support.stack import RunningStack, start_frontends
from tests.support.waiting import Closer, wait_for_condition
from tests.support.watchers import Watcher, completed_session, finished
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.keys import SessionKeys

pytestmark = pytest.mark.cluster_too


@pytest.fixture(scope="module")
def quick_api(stack: RunningStack) -> Iterator[RunningStack]:
    """A relay and an API that send keep-alives every 0.2 s and drop an unwatched feed after 0.1 s."""
    front = start_frontends(
        stack, {"TOKENFAN_SSE_KEEPALIVE_SECONDS": "0.2", "TOKENFAN_FEED_LINGER_SECONDS": "0.1"}
    )
    yield front
    front.stop()


def ended(frames: list[dict[str, Any]]) -> bool:
    return bool(frames) and frames[-1]["type"] == "generation.completed"


async def test_a_subscriber_gets_every_event_with_id_type_and_data(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    sse = await opened(SseWatcher(stack.api_url, session_id)).connect()
    first = await sse.next_block()
    assert first.retry == 1000  # the reconnect delay leads the stream
    body = user_message("stream me over SSE", {"tokens": 40, "rate": 400})
    generation_id = await accept(api, session_id, body)
    await sse.receive_until(finished(generation_id))

    events = [block for block in sse.blocks if block.is_event]
    for block in events:
        frame = block.frame()
        assert block.id is not None
        assert block.event is not None
        assert frame["offset"] == block.id
        assert frame["type"] == block.event
        assert frame["session_id"] == session_id
    assert events[0].event == "generation.started"
    assert events[-1].event == "generation.completed"
    generation = sse.transcript().generations[generation_id]  # raises on a gap, duplicate or bad checksum
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    await assert_exact_delivery(redis, session_id, sse.frames)
    await sse.close()


async def test_a_subscriber_joining_mid_generation_gets_its_history_then_its_live_tail(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    body = user_message("join me midway over SSE", {"tokens": 150, "rate": 100})  # 1.5 s of tokens
    early = await opened(Watcher(stack.relay_url, session_id)).connect()
    generation_id = await accept(api, session_id, body)
    await early.receive_until(lambda frames: sum(f["type"] == "delta" for f in frames) >= 5)
    assert not finished(generation_id)(early.frames)
    late = await opened(SseWatcher(stack.api_url, session_id)).connect()  # no position: everything, then live
    await late.receive_until(finished(generation_id))
    assert late.transcript().generations[generation_id].text == expected_text(body)
    await assert_exact_delivery(redis, session_id, late.frames)
    await early.receive_until(finished(generation_id))  # (a client that stops reading closes slowly)


async def test_last_event_id_resumes_with_exactly_the_events_after_it(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    for cut in range(len(frames) - 1):
        sse = await opened(
            SseWatcher(stack.api_url, session_id, last_event_id=frames[cut]["offset"])
        ).connect()
        await sse.receive_until(ended)
        assert coverage(sse.frames) == coverage(frames[cut + 1 :])
        assert "".join(f.get("content", "") for f in sse.frames) == "".join(
            f.get("content", "") for f in frames[cut + 1 :]
        )
        assert sse.frames[-1] == frames[-1]
        await sse.close()


async def test_after_query_parameter_resumes_with_exactly_the_events_after_it(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    for cut in (0, len(frames) // 2, len(frames) - 2):
        sse = await opened(SseWatcher(stack.api_url, session_id, after=frames[cut]["offset"])).connect()
        await sse.receive_until(ended)
        assert coverage(sse.frames) == coverage(frames[cut + 1 :])
        await sse.close()


async def test_last_event_id_wins_over_after(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    cut = len(frames) // 2
    sse = await opened(
        SseWatcher(stack.api_url, session_id, after=frames[0]["offset"], last_event_id=frames[cut]["offset"])
    ).connect()
    await sse.receive_until(ended)
    assert coverage(sse.frames) == coverage(frames[cut + 1 :])
    await sse.close()


@pytest.mark.parametrize(
    ("after", "last_event_id"),
    [
        (None, "not-an-offset"),
        (None, "ABC:1-0"),
        (None, "abc:1-0-0"),
        (None, "9" * 70),
        (None, "e:" + "9" * 20 + "-0"),
        (None, ""),
        ("not-an-offset", None),
        ("9" * 70, None),
        ("", None),
    ],
    ids=[
        "header-garbage",
        "header-uppercase-epoch",
        "header-extra-part",
        "header-too-long",
        "header-20-digits",
        "header-empty",
        "query",
        "query-too-long",
        "query-empty",
    ],
)
async def test_a_malformed_position_is_refused_with_invalid_offset(
    opened: Closer, stack: RunningStack, session_id: str, after: str | None, last_event_id: str | None
) -> None:
    sse = opened(SseWatcher(stack.api_url, session_id, after=after, last_event_id=last_event_id))
    status, body = await sse.refusal()
    await sse.close()
    assert status == 400
    assert body["error"]["code"] == "invalid_offset"
    assert body["error"]["status"] == 400
    assert body["error"]["message"]


async def test_an_unknown_query_parameter_is_refused_not_ignored(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    """A misspelt ``after`` ignored would replay the whole history to a client that meant to resume."""
    frames = await completed_session(stack.relay_url, api, session_id)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as client:
        for params in ({"aftr": frames[0]["offset"]}, {"after": frames[0]["offset"], "x": "1"}):
            async with client.stream("GET", f"/v1/sessions/{session_id}/events", params=params) as response:
                await response.aread()
            assert response.status_code == 400, params
            assert response.json()["error"]["code"] == "invalid_request"
            assert "aftr" in response.json()["error"]["message"] or "x" in response.json()["error"]["message"]


async def test_an_offset_of_another_incarnation_is_gone(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    epoch, entry_id = str(frames[0]["offset"]).split(":")
    other_epoch = "zz" + epoch[2:] if not epoch.startswith("zz") else "yy" + epoch[2:]
    sse = opened(SseWatcher(stack.api_url, session_id, last_event_id=f"{other_epoch}:{entry_id}"))
    status, body = await sse.refusal()
    await sse.close()
    assert (status, body["error"]["code"], body["error"]["status"]) == (410, "offset_gone", 410)


async def test_an_offset_naming_no_event_is_unknown(
    opened: Closer, stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    frames = await completed_session(stack.relay_url, api, session_id)
    epoch, entry_id = str(frames[-1]["offset"]).split(":")
    milliseconds, sequence = entry_id.split("-")
    for offset in (f"{epoch}:{milliseconds}-{int(sequence) + 7}", f"{epoch}:{int(milliseconds) + 10_000}-0"):
        sse = opened(SseWatcher(stack.api_url, session_id, last_event_id=offset))
        status, body = await sse.refusal()
        await sse.close()
        assert (offset, status, body["error"]["code"]) == (offset, 404, "unknown_offset")


async def test_a_quiet_stream_gets_keep_alive_comments(
    opened: Closer, quick_api: RunningStack, session_id: str
) -> None:
    sse = await opened(SseWatcher(quick_api.api_url, session_id)).connect()

    def keep_alives(blocks: list[SseBlock]) -> int:
        return sum("keep-alive" in block.comments for block in blocks)

    await sse.receive_blocks_until(lambda blocks: keep_alives(blocks) >= 2, timeout=5)
    assert not sse.frames  # comments only: nothing an EventSource would dispatch
    await sse.close()


async def test_sse_and_websocket_subscribers_share_one_reader_per_process(
    opened: Closer, stack: RunningStack, quick_api: RunningStack, redis: Redis, session_id: str
) -> None:
    channel = SessionKeys(session_id).live

    async def subscribers() -> int:
        reply = await redis.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # type: ignore[no-untyped-call]
        return int(reply[1])

    sse_clients = [await opened(SseWatcher(quick_api.api_url, session_id)).connect() for _ in range(2)]
    watcher = await opened(Watcher(quick_api.relay_url, session_id)).connect()
    async with httpx.AsyncClient(base_url=quick_api.api_url, timeout=10) as client:
        body = user_message("shared reader", {"tokens": 20})
        generation_id = await accept(client, session_id, body)
    # Every client received the generation live, so every one of them is subscribed right now.
    await watcher.receive_until(finished(generation_id))
    for sse in sse_clients:
        await sse.receive_until(finished(generation_id))
        assert sse.transcript().generations[generation_id].text == expected_text(body)
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    assert await subscribers() == 2  # the API process and the relay process, once each

    for sse in sse_clients:
        await sse.close()
    await watcher.close()

    async def unsubscribed() -> bool:
        return await subscribers() == 0

    await wait_for_condition(unsubscribed, timeout=10)


# ------------------------------------------------------------------------------------------------ slow clients


@pytest.fixture(scope="module")
def snapshot_api(stack: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(stack, {"TOKENFAN_RELAY_MAX_BUFFER_BYTES": str(LIMIT)})
    yield front
    front.stop()


@pytest.fixture(scope="module")
def closing_api(stack: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(
        stack, {"TOKENFAN_RELAY_MAX_BUFFER_BYTES": str(LIMIT), "TOKENFAN_RELAY_SLOW_POLICY": "close"}
    )
    yield front
    front.stop()


async def stalled_through_a_flood(
    opened: Closer,
    stack: RunningStack,
    front: RunningStack,
    redis: Redis,
    session_id: str,
    body: dict[str, Any],
) -> tuple[Watcher, int, StalledSseReader, str]:
    """A fast WebSocket subscriber throughout, and an SSE client of `front` that joins after the generation's
    first piece and reads nothing until the generation is over (`tests.support.slow`). Returns the fast
    one, how many of its frames precede the stalled one's position, the stalled one, and the generation."""
    fast = await opened(Watcher(stack.relay_url, session_id)).connect()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as client:
        generation_id = await accept(client, session_id, body)
    await fast.receive_until(lambda frames: content_length(frames) >= HEAD)
    joined_at = len(fast.frames)
    channel = SessionKeys(session_id).live

    async def readers() -> int:
        reply = await redis.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # type: ignore[no-untyped-call]
        return int(reply[1])  # the live tail is sharded pub/sub

    watching = await readers()  # the relay of the fast subscriber
    stalled = opened(StalledSseReader(front.api_url, session_id, after=fast.frames[-1]["offset"]))
    await stalled.open()

    async def api_reads_the_session() -> bool:
        return await readers() == watching + 1

    # The API's reader of the session is subscribed: the stalled client catches up (a page at most) and
    # goes live long before the trickle ends and the flood begins.
    await wait_for_condition(api_reads_the_session, timeout=5, interval=0.005)
    await fast.receive_until(finished(generation_id), timeout=30)
    stalled.resume()
    return fast, joined_at, stalled, generation_id


def assert_assembles_exactly(frames: list[dict[str, Any]], generation_id: str, body: dict[str, Any]) -> None:
    generation = transcript_of(frames).generations[generation_id]  # raises on offsets or seqs that skip
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)


async def test_a_stalled_sse_client_recovers_from_a_snapshot_event(
    opened: Closer, stack: RunningStack, snapshot_api: RunningStack, redis: Redis, session_id: str
) -> None:
    body = flood("flood an SSE client")
    fast, joined_at, stalled, generation_id = await stalled_through_a_flood(
        opened, stack, snapshot_api, redis, session_id, body
    )
    end = fast.frames[-1]["offset"]
    await stalled.receive_until(lambda frames: bool(frames) and frames[-1]["offset"] == end)
    received = stalled.frames
    kinds = [frame["type"] for frame in received]
    # The server sees the client as drained once the kernel takes what was queued, which can happen before
    # the client reads again: it then catches up from its snapshot, goes live, and while it still reads
    # nothing the rest of the flood can pass the limit once more and earn it another snapshot (the second
    # row of the table, not a snapshot while recovering). Each one must replace the backlog before it.
    snapshots = [frame for frame in received if frame["type"] == "snapshot"]
    assert snapshots, "a snapshot event replaces the skipped backlog"
    for snapshot in snapshots:
        assert snapshot["reason"] == "slow_consumer"
        assert [view["generation_id"] for view in snapshot["generations"]] == [generation_id]
    positions = [index for index, kind in enumerate(kinds) if kind == "snapshot"]
    assert all(later - earlier > 1 for earlier, later in itertools.pairwise(positions)), (
        "a further snapshot only after the client went live again and fell behind again"
    )
    assert [block.event for block in stalled.blocks if block.is_event] == kinds  # as `event:` says too
    assert len(coverage(received)) < len(coverage(fast.frames[joined_at:])), "the backlog was skipped"
    assert_assembles_exactly(fast.frames[:joined_at] + received, generation_id, body)


async def test_a_stalled_sse_client_under_the_close_policy_ends_with_4008_and_resumes_exactly(
    opened: Closer, stack: RunningStack, closing_api: RunningStack, redis: Redis, session_id: str
) -> None:
    body = flood("flood an SSE client that gets closed")
    fast, joined_at, stalled, generation_id = await stalled_through_a_flood(
        opened, stack, closing_api, redis, session_id, body
    )
    await stalled.receive_until(lambda frames: False)  # until the server ends the response
    assert stalled.status == 200
    *events, last = [block for block in stalled.blocks if block.is_event]
    assert last.event == "error"
    assert last.frame()["code"] == 4008
    received = [block.frame() for block in events]
    assert "snapshot" not in {frame["type"] for frame in received}
    position = received[-1]["offset"] if received else fast.frames[joined_at - 1]["offset"]
    assert position != fast.frames[-1]["offset"], "it was ended before the generation's end"

    resumed = await opened(SseWatcher(closing_api.api_url, session_id, last_event_id=position)).connect()
    await resumed.receive_until(lambda got: bool(got) and got[-1].get("offset") == fast.frames[-1]["offset"])
    frames = fast.frames[:joined_at] + received + resumed.frames
    assert_assembles_exactly(frames, generation_id, body)
    await assert_exact_delivery(redis, session_id, frames)
