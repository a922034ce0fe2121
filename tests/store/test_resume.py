"""Where a subscriber may resume, and the stream's pages after it: trimmed and foreign offsets are told apart."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from redis.asyncio import Redis

from tests.store.helpers import REQUEST, delta, deltas, make_store, resolved, running, stream_ids, write_texts
from tests.support.requests import new_session_id
from tokenfan.contract.errors import OffsetGone, UnknownOffset
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import WriteItem, WriteOutcome


async def after_millisecond(redis: Redis, ms: int) -> None:
    """Return once the server's clock is past `ms`, so that its next entry id starts a new millisecond."""
    async with asyncio.timeout(5):
        while True:
            seconds, micros = await resolved(redis.time())
            if seconds * 1000 + micros // 1000 > ms:
                return


async def test_check_resume(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.check_resume(session_id, None) == StreamId.ZERO
    generation_id, attempt = await running(store, session_id)
    await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "ab"))]
    )
    await after_millisecond(redis, (await stream_ids(redis, session_id))[-1].ms)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "cd", first_seq=3))]
    )
    assert result.last_offset is not None
    epoch = result.last_offset.epoch
    ids = await stream_ids(redis, session_id)
    assert len(ids) == 4
    assert await store.check_resume(session_id, None) == StreamId.ZERO
    for stream_id in ids:
        assert await store.check_resume(session_id, Offset(epoch, stream_id)) == stream_id
    with pytest.raises(OffsetGone):
        await store.check_resume(session_id, Offset("other1", ids[1]))
    beyond = StreamId(ids[-1].ms, ids[-1].seq + 1)
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, beyond))
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, StreamId(ids[-1].ms + 10_000, 0)))
    between = StreamId(ids[1].ms, ids[1].seq + 1)  # the two writes fell in different milliseconds
    assert ids[1] < between < ids[2]
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, between))


async def test_an_offset_before_the_first_entry_of_an_untrimmed_stream_is_unknown(
    redis: Redis, session_id: str
) -> None:
    """Nothing was ever trimmed (the first entry's predecessor is 0-0), so an id below the first entry was
    never an entry: that is UnknownOffset (404), not OffsetGone (410, "rebuild from a snapshot")."""
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcd")
    before_first = StreamId(ids[0].ms - 1, 0)
    with pytest.raises(UnknownOffset):
        await store.check_resume(session_id, Offset(epoch, before_first))


async def test_check_resume_on_a_session_that_never_existed(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    with pytest.raises(OffsetGone):
        await store.check_resume(session_id, Offset("abc", StreamId(1, 0)))


async def test_trimmed_offsets_are_gone(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcdefghij")
    await redis.xtrim(SessionKeys(session_id).events, maxlen=3, approximate=False)
    kept = await stream_ids(redis, session_id)
    assert kept == ids[-3:]
    for stream_id in ids[:6]:
        with pytest.raises(OffsetGone):
            await store.check_resume(session_id, Offset(epoch, stream_id))
        with pytest.raises(OffsetGone):
            await store.read_after(session_id, stream_id, 10)
    # Reading from the very start serves what is retained (that is how a fresh subscriber begins).
    assert [entry.stream_id for entry in await store.read_after(session_id, StreamId.ZERO, 10)] == ids[-3:]
    assert await store.check_resume(session_id, Offset(epoch, ids[7])) == ids[7]
    # Reading on from the newest trimmed entry misses nothing: the next entry is retained.
    after = await store.read_after(session_id, ids[6], 10)
    assert [entry.stream_id for entry in after] == ids[7:]


async def test_resuming_at_the_newest_trimmed_entry(redis: Redis, session_id: str) -> None:
    """A subscriber whose last event was the last one trimmed has missed nothing: every event after it is
    still retained (read_after serves them), so check_resume must let it resume there. It must not answer
    UnknownOffset ("no event of this session has this offset"): the session did have that event."""
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcdefghij")
    await redis.xtrim(SessionKeys(session_id).events, maxlen=3, approximate=False)
    newest_trimmed = ids[6]
    assert [entry.stream_id for entry in await store.read_after(session_id, newest_trimmed, 10)] == ids[7:]
    assert await store.check_resume(session_id, Offset(epoch, newest_trimmed)) == newest_trimmed


async def test_approximate_trimming_makes_old_offsets_gone(redis: Redis, session_id: str) -> None:
    store = make_store(redis, stream_max_length=10)
    generation_id, attempt = await running(store, session_id)
    events = [delta(session_id, generation_id, seq, "t") for seq in range(1, 301)]
    (result,) = await store.write([WriteItem(session_id, generation_id, attempt, events)])
    assert (result.outcome, result.last_seq) == (WriteOutcome.OK, 300)
    assert result.last_offset is not None
    epoch = result.last_offset.epoch
    kept = await stream_ids(redis, session_id)
    assert len(kept) < 300
    assert kept[-1] == result.last_offset.stream_id
    record = await store.generation(generation_id)
    assert record is not None
    assert record.first_offset is not None
    first = Offset(epoch, StreamId.parse(record.first_offset.split(":")[1]))
    with pytest.raises(OffsetGone):
        await store.check_resume(session_id, first)
    assert await store.check_resume(session_id, Offset(epoch, kept[-1])) == kept[-1]
    assert record.text == "t" * 300  # the text snapshot is never trimmed


async def test_read_after_pages(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    epoch, ids = await write_texts(store, session_id, "abcdefg")
    pages = []
    after = StreamId.ZERO
    while True:
        page = await store.read_after(session_id, after, 3)
        if not page:
            break
        pages.append(page)
        after = page[-1].stream_id
    assert [len(page) for page in pages] == [3, 3, 1]
    entries = [entry for page in pages for entry in page]
    assert [entry.stream_id for entry in entries] == ids
    frames = [json.loads(entry.frame()) for entry in entries]
    assert [frame["content"] for frame in frames] == list("abcdefg")
    assert [frame["offset"] for frame in frames] == [f"{epoch}:{stream_id}" for stream_id in ids]
    assert all(entry.epoch == epoch.encode() for entry in entries)
    assert await store.read_after(session_id, ids[-1], 3) == []
    assert await store.read_after(new_session_id(), StreamId.ZERO, 3) == []


async def test_tail(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    assert await store.tail(session_id) == (None, StreamId.ZERO)
    quiet = new_session_id()
    accepted = await store.accept(quiet, new_generation_id(), request=REQUEST, model="m")
    assert await store.tail(quiet) == (accepted.epoch.encode(), StreamId.ZERO)  # accepted, nothing written
    epoch, ids = await write_texts(store, session_id, "xy")
    assert await store.tail(session_id) == (epoch.encode(), ids[-1])


async def test_read_before_reads_backwards_and_names_the_predecessor(redis: Redis, session_id: str) -> None:
    """A run read backwards follows on from the predecessor it names, as a page read forwards does from its
    start: the relay's catch-up history grows backwards this way, each entry read once."""
    store = make_store(redis)
    _, ids = await write_texts(store, session_id, "abcdefghij")
    entries, predecessor = await store.read_before(session_id, ids[8], 3)
    assert [entry.stream_id for entry in entries] == ids[6:9]
    assert predecessor == ids[5]
    forwards = await store.read_after(session_id, predecessor, 3)
    assert forwards == entries
    # Built without their dataclasses' __init__: still hashed and frozen as those built with it are.
    assert [hash(entry) for entry in entries] == [hash(entry) for entry in forwards]
    assert [hash(entry.stream_id) for entry in entries] == [hash(stream_id) for stream_id in ids[6:9]]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entries[0].stream_id.ms = 0  # type: ignore[misc]
    # One epoch object for a page's entries (a relay's catch-up history holds thousands), equal to theirs.
    assert len({id(entry.epoch) for entry in entries}) == 1
    assert {entry.epoch for entry in entries} == {entry.epoch for entry in forwards}
    entries, predecessor = await store.read_before(session_id, ids[1], 5)
    assert [entry.stream_id for entry in entries] == ids[:2]
    assert predecessor == StreamId.ZERO  # the first entry: nothing before it
    await redis.xtrim(SessionKeys(session_id).events, maxlen=3, approximate=False)
    entries, predecessor = await store.read_before(session_id, ids[8], 5)
    assert [entry.stream_id for entry in entries] == ids[7:9]
    assert predecessor == ids[6]  # trimmed, but named: the history cannot claim anything before it
    assert await store.read_before(session_id, ids[5], 5) == ([], None)
