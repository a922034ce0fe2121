"""The resuming client (`tokenfan.client.SessionStream`) against real relays: it survives a relay killed
mid-stream, rebuilds from a snapshot when its position is gone, and gives up at once on a refused request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any, cast

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.delivery import assert_exact_delivery, transcript_of
from tests.support.requests import accept, expected_text, user_message
from tests.support.stack import RunningStack
from tests.support.watchers import Watcher, finished
from tokenfan.cli.embedded_redis import EmbeddedRedis, free_port
from tokenfan.client import SessionStream
from tokenfan.contract.errors import InvalidRequest, OffsetGone
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.keys import SessionKeys


def frames_of(stream: SessionStream) -> AsyncGenerator[dict[str, Any], None]:
    """The stream's iterator, typed so that it can be closed (`contextlib.aclosing`)."""
    return cast(AsyncGenerator[dict[str, Any], None], aiter(stream))


async def collect(
    stream: SessionStream,
    frames: list[dict[str, Any]],
    done: Any,
    progress: asyncio.Event | None = None,
) -> None:
    """Append the stream's frames to `frames` until `done(frames)` holds; set `progress` at the first delta."""
    async with contextlib.aclosing(frames_of(stream)) as iterator:
        async for frame in iterator:
            frames.append(frame)
            if progress is not None and frame["type"] == "delta":
                progress.set()
            if done(frames):
                return


@pytest.mark.fault
async def test_the_client_resumes_exactly_across_a_relay_killed_and_restarted(
    redis_server: EmbeddedRedis, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    relays = RunningStack(redis_url=redis_server.url)
    port = free_port()
    try:
        relay = relays.spawn("relay", ["--port", str(port)], name="relay-1")
        relay_url = await asyncio.to_thread(relay.wait_ready)
        body = user_message("outlive the relay", {"tokens": 200, "rate": 100})
        stream = SessionStream(relay_url, session_id, min_backoff=0.05)
        frames: list[dict[str, Any]] = []
        first_delta = asyncio.Event()
        generation_id = await accept(api, session_id, body)
        reader = asyncio.create_task(collect(stream, frames, finished(generation_id), first_delta))
        try:
            async with asyncio.timeout(10):
                await first_delta.wait()
            relay.kill()  # SIGKILL: no closing handshake, the client sees the connection drop
            before_kill = len(frames)
            restarted = relays.spawn("relay", ["--port", str(port)], name="relay-2")
            assert await asyncio.to_thread(restarted.wait_ready) == relay_url
            async with asyncio.timeout(30):
                await reader
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        relays.stop()

    assert stream.connections >= 2
    assert not finished(generation_id)(frames[:before_kill]), "the relay died mid-stream"
    generation = transcript_of(frames).generations[generation_id]  # no gap, no duplicate across the kill
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    await assert_exact_delivery(redis, session_id, frames)


async def trimmed_session(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A completed generation whose stream was trimmed to its last two entries: its first offset is gone."""
    watcher = await Watcher(stack.relay_url, session_id).connect()
    try:
        body = user_message("trim me", {"tokens": 30, "rate": 400})
        generation_id = await accept(api, session_id, body)
        await watcher.receive_until(finished(generation_id))
    finally:
        await watcher.close()
    assert len(watcher.frames) >= 6
    await redis.xtrim(SessionKeys(session_id).events, maxlen=2, approximate=False)
    return watcher.frames, body


async def test_a_gone_offset_is_rebuilt_from_a_snapshot_when_the_api_is_known(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    history, first_body = await trimmed_session(stack, api, redis, session_id)
    first_id = history[0]["generation_id"]
    stream = SessionStream(
        stack.relay_url, session_id, after=history[0]["offset"], min_backoff=0.05, api_url=stack.api_url
    )
    frames: list[dict[str, Any]] = []
    snapshot_seen = asyncio.Event()
    next_id = ""  # known once the snapshot has arrived

    def done(got: list[dict[str, Any]]) -> bool:
        if got and got[0]["type"] == "snapshot":
            snapshot_seen.set()
        return bool(next_id) and finished(next_id)(got[1:])

    reader = asyncio.create_task(collect(stream, frames, done))
    try:
        async with asyncio.timeout(10):
            await snapshot_seen.wait()
        next_body = user_message("after the rebuild")
        next_id = await accept(api, session_id, next_body)
        async with asyncio.timeout(20):
            await reader
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    snapshot = frames[0]
    assert snapshot["type"] == "snapshot"
    assert snapshot["reason"] == "offset_gone"
    assert snapshot["offset"] == history[-1]["offset"]
    assert [view["generation_id"] for view in snapshot["generations"]] == [first_id]
    # Then it goes on live from the snapshot: nothing repeated, nothing missing.
    assert {frame["generation_id"] for frame in frames[1:]} == {next_id}
    transcript = transcript_of(frames)
    assert transcript.generations[first_id].status is GenerationStatus.COMPLETED
    assert transcript.generations[first_id].text == expected_text(first_body)
    assert transcript.generations[next_id].status is GenerationStatus.COMPLETED
    assert transcript.generations[next_id].text == expected_text(next_body)
    assert stream.connections == 2


async def test_a_gone_offset_raises_offset_gone_without_the_api(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    history, _ = await trimmed_session(stack, api, redis, session_id)
    stream = SessionStream(stack.relay_url, session_id, after=history[0]["offset"], min_backoff=0.05)
    frames: list[dict[str, Any]] = []
    with pytest.raises(OffsetGone):
        async with asyncio.timeout(10):
            await collect(stream, frames, lambda _: False)
    assert frames == []
    assert stream.connections == 1


async def test_a_refused_request_raises_at_once_without_retrying(stack: RunningStack) -> None:
    stream = SessionStream(stack.relay_url, "bad{session", min_backoff=0.05)
    frames: list[dict[str, Any]] = []
    with pytest.raises(InvalidRequest) as refused:
        async with asyncio.timeout(5):
            await collect(stream, frames, lambda _: False)
    assert refused.value.message
    assert frames == []
    assert stream.connections == 1  # refused once, never retried
