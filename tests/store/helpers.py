"""What the store's tests share: a store on the test server, events to write, and reads of what Redis holds."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tokenfan.contract.events import EventType, encode_body, event_body, text_sha256
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import StreamId
from tokenfan.store import (
    AcceptOutcome,
    EventWrite,
    StartOutcome,
    StartResult,
    Store,
    WriteItem,
    WriteOutcome,
)

T = TypeVar("T")

REQUEST: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "héllo"}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def resolved(value: Awaitable[T] | T) -> T:
    """Await a redis-py command (typed as "awaitable or not", since one class serves sync and async)."""
    assert inspect.isawaitable(value)
    return await value


#: Stores made by the running test: their per-node clients are closed after it (`tests/store/conftest.py`).
MADE: list[Store] = []


def make_store(redis: Redis | RedisCluster, **options: Any) -> Store:
    values: dict[str, Any] = {"session_ttl_seconds": 3600, "stream_max_length": 1000}
    values.update(options)
    store = Store(redis, **values)
    MADE.append(store)
    return store


def delta(session_id: str, generation_id: str, seq: int, text: str = "x") -> EventWrite:
    body = event_body(
        EventType.DELTA, session_id=session_id, generation_id=generation_id, seq=seq, content=text
    )
    return EventWrite(seq, encode_body(body), text)


def deltas(session_id: str, generation_id: str, texts: str, first_seq: int = 1) -> list[EventWrite]:
    return [delta(session_id, generation_id, first_seq + i, text) for i, text in enumerate(texts)]


def completed(session_id: str, generation_id: str, seq: int, text: str) -> EventWrite:
    body = event_body(
        EventType.GENERATION_COMPLETED,
        session_id=session_id,
        generation_id=generation_id,
        seq=seq,
        finish_reason="stop",
        usage=USAGE,
        length=len(text),
        sha256=text_sha256(text),
    )
    return EventWrite(seq, encode_body(body))


async def accept(store: Store, session_id: str) -> str:
    generation_id = new_generation_id()
    result = await store.accept(session_id, generation_id, request=REQUEST, model="m")
    assert result.outcome is AcceptOutcome.ACCEPTED
    return generation_id


async def running(store: Store, session_id: str) -> tuple[str, int]:
    generation_id = await accept(store, session_id)
    start = await store.start(session_id, generation_id)
    assert start.outcome is StartOutcome.STARTED
    return generation_id, start.attempt


async def write_texts(store: Store, session_id: str, texts: str) -> tuple[str, list[StreamId]]:
    """Run a new generation of the session that writes one delta per character; the stream's epoch and ids."""
    generation_id, attempt = await running(store, session_id)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, texts))]
    )
    assert result.outcome is WriteOutcome.OK
    assert result.last_offset is not None
    return result.last_offset.epoch, await stream_ids(store.redis, session_id)


async def stream_ids(redis: Redis | RedisCluster, session_id: str) -> list[StreamId]:
    entries = await redis.xrange(SessionKeys(session_id).events)
    return [StreamId.parse(entry_id) for entry_id, _ in entries]


async def stream_texts(redis: Redis, session_id: str) -> list[str]:
    entries = await redis.xrange(SessionKeys(session_id).events)
    return [json.loads(fields[b"d"]).get("content", "") for _, fields in entries]


async def queue_of(redis: Redis, session_id: str) -> list[str]:
    return [raw.decode() for raw in await resolved(redis.lrange(SessionKeys(session_id).queue, 0, -1))]


async def start_after_lease(store: Store, session_id: str, generation_id: str) -> StartResult:
    """Call `start` until the live lease has expired; the store says how long it has left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while True:
        result = await store.start(session_id, generation_id)
        if result.outcome is not StartOutcome.BUSY:
            return result
        assert result.busy_for_ms > 0
        assert loop.time() < deadline, "the lease never expired"
        await asyncio.sleep(result.busy_for_ms / 1000)
