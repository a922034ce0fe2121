"""Resume checks shared by subscribers resuming from the same offset at once, over a real Valkey: each one
gets the answer its own check would have given, a trimmed offset is refused to every one of them, and one
subscriber leaving does not take the others' answer with it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from api.live.resume_checks import ResumeChecks
from tests.store.helpers import write_texts
from tests.support.requests import new_session_id
from tokenfan.contract.errors import OffsetGone, UnknownOffset
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import Store


def counting(store: Store) -> list[Offset | None]:
    """Record every check `store` makes in Redis."""
    calls: list[Offset | None] = []
    check = store.check_resume

    async def counted(session_id: str, offset: Offset | None) -> Any:
        calls.append(offset)
        return await check(session_id, offset)

    store.check_resume = counted  # type: ignore[method-assign]
    return calls


async def test_resumers_from_one_offset_share_its_check(redis: Redis) -> None:
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    calls = counting(store)
    checks = ResumeChecks(store)
    session_id = new_session_id()
    epoch, ids = await write_texts(store, session_id, "abcdef")
    at_c, at_e = Offset(epoch, ids[2]), Offset(epoch, ids[4])
    positions = await asyncio.gather(*(checks.check(session_id, at_c) for _ in range(20)))
    assert positions == [ids[2]] * 20
    assert calls == [at_c]  # one call for the twenty
    both = await asyncio.gather(checks.check(session_id, at_c), checks.check(session_id, at_e))
    assert list(both) == [ids[2], ids[4]]
    assert calls[1:] == [at_c, at_e]  # different offsets: a call each; a finished check is not reused
    assert await checks.check(session_id, None) == StreamId.ZERO


async def test_a_refused_offset_is_refused_to_every_resumer_sharing_its_check(redis: Redis) -> None:
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    checks = ResumeChecks(store)
    session_id = new_session_id()
    epoch, ids = await write_texts(store, session_id, "abcdef")
    await redis.xtrim(SessionKeys(session_id).events, maxlen=2, approximate=False)
    answers = await asyncio.gather(
        *(checks.check(session_id, Offset(epoch, ids[1])) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(answer, OffsetGone) for answer in answers)
    with pytest.raises(UnknownOffset):
        await checks.check(session_id, Offset(epoch, StreamId(ids[5].ms, ids[5].seq + 1)))


async def test_a_resumer_leaving_leaves_the_shared_check_to_the_others(redis: Redis) -> None:
    store = Store(redis, session_ttl_seconds=3600, stream_max_length=1000)
    checks = ResumeChecks(store)
    session_id = new_session_id()
    epoch, ids = await write_texts(store, session_id, "abc")
    offset = Offset(epoch, ids[0])
    leaving = asyncio.ensure_future(checks.check(session_id, offset))
    staying = asyncio.ensure_future(checks.check(session_id, offset))
    await asyncio.sleep(0)
    leaving.cancel()
    assert await staying == ids[0]
    with pytest.raises(asyncio.CancelledError):
        await leaving
