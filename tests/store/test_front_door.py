"""The front door's own Redis state against a real Valkey: response records, and where a generation's events
begin (the predecessor an entry names), including once that entry is gone."""

from __future__ import annotations

from redis.asyncio import Redis

from tests.support.requests import new_session_id
from tokenfan.contract.events import EventType, encode_body, event_body
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import AcceptOutcome, EventWrite, Store, WriteItem, WriteOutcome
from tokenfan.store.front_door import event_predecessor, response_record, save_response_record


def make_store(redis: Redis) -> Store:
    return Store(redis, session_ttl_seconds=3600, stream_max_length=1000)


async def test_a_response_record_is_kept_with_its_generation_and_expires_after_it(redis: Redis) -> None:
    store, session_id, generation_id = make_store(redis), new_session_id(), new_generation_id()
    record = {"model": "m", "instructions": "Be brief. — ✓", "tools": [], "background": True}
    assert await response_record(store, session_id, generation_id) is None
    await save_response_record(store, session_id, generation_id, record)
    assert await response_record(store, session_id, generation_id) == record
    ttl = await redis.ttl(SessionKeys(session_id).generation_response(generation_id))
    assert 3600 < ttl <= 3600 + 86_400


async def started(store: Store, session_id: str, texts: str) -> tuple[str, list[Offset]]:
    """A started generation with one delta per character of `texts`; its id and each event's offset."""
    generation_id = new_generation_id()
    accepted = await store.accept(
        session_id, generation_id, request={"model": "m", "messages": []}, model="m"
    )
    assert accepted.outcome is AcceptOutcome.ACCEPTED
    start = await store.start(session_id, generation_id)
    offsets = []
    for seq, text in enumerate(texts, start=1):
        body = event_body(
            EventType.DELTA, session_id=session_id, generation_id=generation_id, seq=seq, content=text
        )
        (result,) = await store.write(
            [WriteItem(session_id, generation_id, start.attempt, [EventWrite(seq, encode_body(body), text)])]
        )
        assert result.outcome is WriteOutcome.OK
        assert result.last_offset is not None
        offsets.append(result.last_offset)
    return generation_id, offsets


async def test_each_event_names_the_entry_before_it(redis: Redis) -> None:
    store, session_id = make_store(redis), new_session_id()
    _, offsets = await started(store, session_id, "abc")
    assert await event_predecessor(store, session_id, offsets[0]) == StreamId.ZERO
    assert await event_predecessor(store, session_id, offsets[1]) == offsets[0].stream_id
    assert await event_predecessor(store, session_id, offsets[2]) == offsets[1].stream_id


async def test_an_event_that_is_gone_or_of_another_epoch_has_no_predecessor(redis: Redis) -> None:
    store, session_id = make_store(redis), new_session_id()
    _, offsets = await started(store, session_id, "ab")
    other_epoch = Offset("zzzzzzzz", offsets[1].stream_id)
    assert await event_predecessor(store, session_id, other_epoch) is None
    await redis.xtrim(SessionKeys(session_id).events, maxlen=1, approximate=False)
    assert await event_predecessor(store, session_id, offsets[0]) is None
    assert await event_predecessor(store, session_id, offsets[1]) == offsets[0].stream_id
