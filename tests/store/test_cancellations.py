"""The workers' fast path for cancellation: requests heard over pub/sub, from any API process."""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis

from tests.store.helpers import REQUEST, accept, make_store, running
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import CANCEL_CHANNEL
from tokenfan.store.cancellations import listen_for_cancellations
from tokenfan.store.topology import Topology


async def test_requests_reach_the_listener(redis: Redis, session_id: str) -> None:
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = asyncio.create_task(
        listen_for_cancellations(
            Topology(redis), lambda generation_id, reason: heard.put_nowait((generation_id, reason))
        )
    )
    try:
        await _until_subscribed(redis, heard)
        store = make_store(redis)
        queued = await accept(store, session_id)
        await store.request_cancel(session_id, queued, "unwatched")
        assert await _next_for(heard, queued) == "unwatched"
        head, _ = await running(store, session_id + "-2")
        await store.accept(
            session_id + "-2", new_generation_id(), request=REQUEST, model="m", policy="interrupt"
        )
        assert await _next_for(heard, head) == "interrupted"
        other = new_generation_id()
        await redis.publish(CANCEL_CHANNEL, other)  # no reason given
        assert await _next_for(heard, other) == "requested"
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


async def _until_subscribed(redis: Redis, heard: asyncio.Queue[tuple[str, str]]) -> None:
    """Publish a probe until the listener hears one: from then on, it hears every request."""
    probe = new_generation_id()
    async with asyncio.timeout(10):
        while True:
            await redis.publish(CANCEL_CHANNEL, f"{probe} probe")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    while (await heard.get())[0] != probe:
                        pass
                    return


async def _next_for(heard: asyncio.Queue[tuple[str, str]], generation_id: str) -> str:
    """The reason of the next request heard for `generation_id` (the shared server carries others too)."""
    async with asyncio.timeout(10):
        while True:
            heard_id, reason = await heard.get()
            if heard_id == generation_id:
                return reason
