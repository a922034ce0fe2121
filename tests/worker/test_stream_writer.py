"""The stream writer against a real Redis: what one generation's bad item costs (its own generation, never
the flusher that every generation of the process shares)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.store.helpers import make_store, running
from tests.support.requests import new_session_id
from tests.support.waiting import wait_for_condition
from tokenfan.contract.keys import SessionKeys
from tokenfan.store import Store
from worker.stream_writer import GenerationStream, StreamWriter, WriteRefused


@pytest.fixture
async def writer(redis: Redis) -> AsyncIterator[StreamWriter]:
    writer = StreamWriter(make_store(redis))
    flusher = asyncio.create_task(writer.run())
    yield writer
    assert not flusher.done(), "the flusher ended"
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)


async def opened(writer: StreamWriter, store: Store) -> GenerationStream:
    session_id = new_session_id()
    generation_id, attempt = await running(store, session_id)
    return writer.open(session_id, generation_id, attempt, 0)


async def refused(stream: GenerationStream) -> None:
    async def failed() -> bool:
        return isinstance(stream._error, WriteRefused)

    await wait_for_condition(failed)


async def stored_text(redis: Redis, stream: GenerationStream) -> bytes | None:
    text: bytes | None = await redis.get(SessionKeys(stream.session_id).generation_text(stream.generation_id))
    return text


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param(lambda stream: stream.add_event("x.bad", note="\ud800"), id="utf8-cannot-encode-it"),
        pytest.param(lambda stream: stream.add_event("x.bad", value=object()), id="json-cannot-encode-it"),
    ],
)
async def test_an_item_that_cannot_be_written_fails_its_generation_and_no_other(
    writer: StreamWriter, redis: Redis, poison: object
) -> None:
    store = writer.store
    good, bad = await opened(writer, store), await opened(writer, store)
    good.add_content("fine")
    poison(bad)  # type: ignore[operator]  # in the same flush as good's piece: nothing awaited in between
    await refused(bad)
    with pytest.raises(WriteRefused):
        bad._check()

    async def written() -> bool:
        return await stored_text(redis, good) == b"fine"

    await wait_for_condition(written)
    good.add_content(", and later")  # the flusher goes on for everyone else

    async def still_written() -> bool:
        return await stored_text(redis, good) == b"fine, and later"

    await wait_for_condition(still_written)
    assert await stored_text(redis, bad) is None  # none of its events reached Redis
