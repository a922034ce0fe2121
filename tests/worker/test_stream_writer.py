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


async def test_events_redis_lost_are_written_again_exactly_as_first_written(
    writer: StreamWriter, redis: Redis
) -> None:
    """A failover can promote a replica that missed the last writes. The attempt's next write finds the
    gap and writes what was lost again: each event's body byte for byte as first written (plain deltas are
    kept as their text alone and rebuilt), and the text and reasoning with them."""
    stream = await opened(writer, writer.store)
    keys = SessionKeys(stream.session_id)
    names = [
        keys.events,
        keys.meta,
        keys.generation(stream.generation_id),
        keys.generation_text(stream.generation_id),
        keys.generation_reasoning(stream.generation_id),
    ]

    async def bodies() -> list[bytes]:
        return [fields[b"d"] for _, fields in await redis.xrange(keys.events)]

    async def text_is(expected: str) -> None:
        async def written() -> bool:
            return await stored_text(redis, stream) == expected.encode()

        await wait_for_condition(written)

    stream.add_content("kept ")
    await text_is("kept ")
    async with redis.pipeline(transaction=True) as dumping:  # one instant of the session, as a replica holds
        for name in names:
            dumping.dump(name)
        earlier: list[bytes | None] = await dumping.execute()
    pieces = ["lost ", 'and "found" ', "é\n", "\U0001f600 ", "over "]
    for piece in pieces:
        stream.add_content(piece)
        await text_is("kept " + "".join(pieces[: pieces.index(piece) + 1]))  # an event each
    stream.add_event("x.note", note="between")
    stream.add_reasoning("thinking")
    stream.add_content("after")
    text = "kept " + "".join(pieces) + "after"
    await text_is(text)
    written = await bodies()
    async with redis.pipeline(transaction=True) as restoring:  # the failover: back to that instant
        for name, value in zip(names, earlier, strict=True):
            if value is None:
                restoring.delete(name)
            else:
                restoring.restore(name, 0, value, replace=True)
        await restoring.execute()
    stream.add_content(" again")  # the next write finds the gap
    await text_is(text + " again")
    rewritten = await bodies()
    assert rewritten[: len(written)] == written
    assert len(rewritten) == len(written) + 1
    assert await redis.get(keys.generation_reasoning(stream.generation_id)) == b"thinking"
