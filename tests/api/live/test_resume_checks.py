"""Resume checks made together: the checks of one session that arrive while its call is on its way go out in
one call, and each subscriber gets exactly the answer its own check gives, or the error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from api.live.resume_checks import MAX_CHECKS_PER_CALL, ResumeChecks
from tests.store.helpers import write_texts
from tests.support.waiting import wait_for_condition
from tokenfan.contract.errors import OffsetGone, StorageUnavailable, UnknownOffset
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import PositionReply, Store


class CountingStore(Store):
    """A store that counts its `resume_verdicts` calls (and can be told to fail them)."""

    calls: list[int]
    fail = False
    gate: asyncio.Event | None = None  # when set: each call waits for it before it goes out

    async def resume_verdicts(self, session_id: str, offsets: Sequence[Offset]) -> list[PositionReply]:
        self.calls.append(len(offsets))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise StorageUnavailable("storage is away")
        return await super().resume_verdicts(session_id, offsets)


@pytest.fixture
async def checks(redis: Redis) -> AsyncIterator[ResumeChecks]:
    store = CountingStore(redis, session_ttl_seconds=3600, stream_max_length=1000)
    store.calls = []
    tasks: set[asyncio.Task[None]] = set()

    def spawn(work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    yield ResumeChecks(store, spawn)
    await asyncio.gather(*tasks)


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


def calls(checks: ResumeChecks) -> list[int]:
    assert isinstance(checks.store, CountingStore)
    return checks.store.calls


async def outcome(checks: ResumeChecks, session_id: str, offset: Offset | None) -> StreamId | type[Exception]:
    try:
        return await checks.check(session_id, offset)
    except (OffsetGone, UnknownOffset, StorageUnavailable) as exc:
        return type(exc)


async def test_checks_that_arrive_together_go_out_together_each_with_its_own_answer(
    checks: ResumeChecks, session_id: str
) -> None:
    epoch, ids = await write_texts(checks.store, session_id, "abcdef")
    offsets = [Offset(epoch, ids[i % 6]) for i in range(40)] + [
        Offset("other1", ids[2]),
        Offset(epoch, StreamId(ids[-1].ms + 10_000, 0)),
    ]
    expected = [await outcome(checks, session_id, offset) for offset in offsets]  # one by one
    assert calls(checks) == [1] * len(offsets)
    calls(checks).clear()
    together = await asyncio.gather(*(outcome(checks, session_id, offset) for offset in offsets))
    assert together == expected
    assert together[-2:] == [OffsetGone, UnknownOffset]
    assert sum(calls(checks)) == len(offsets)
    assert len(calls(checks)) == 1  # all asked before the first call went out


async def test_checks_arriving_while_a_call_is_on_its_way_wait_for_the_next(
    checks: ResumeChecks, session_id: str
) -> None:
    epoch, ids = await write_texts(checks.store, session_id, "abc")
    store = checks.store
    assert isinstance(store, CountingStore)
    store.gate = asyncio.Event()
    first = asyncio.create_task(checks.check(session_id, Offset(epoch, ids[0])))
    await wait_for_condition(_async(lambda: bool(calls(checks))), message="the first call did not start")
    later = [asyncio.create_task(checks.check(session_id, Offset(epoch, ids[i]))) for i in (1, 2, 1)]
    await asyncio.sleep(0)  # they wait: the first call has not returned
    assert calls(checks) == [1]
    store.gate.set()
    assert await first == ids[0]
    assert await asyncio.gather(*later) == [ids[1], ids[2], ids[1]]
    assert calls(checks) == [1, 3]


async def test_a_call_holds_at_most_its_share_of_checks(checks: ResumeChecks, session_id: str) -> None:
    epoch, ids = await write_texts(checks.store, session_id, "ab")
    many = MAX_CHECKS_PER_CALL + 5
    answers = await asyncio.gather(*(checks.check(session_id, Offset(epoch, ids[1])) for _ in range(many)))
    assert answers == [ids[1]] * many
    assert calls(checks) == [MAX_CHECKS_PER_CALL, 5]


async def test_a_failed_call_fails_each_of_its_checks_and_the_next_ones_still_go_out(
    checks: ResumeChecks, session_id: str
) -> None:
    epoch, ids = await write_texts(checks.store, session_id, "ab")
    store = checks.store
    assert isinstance(store, CountingStore)
    store.fail = True
    failed = await asyncio.gather(*(outcome(checks, session_id, Offset(epoch, ids[0])) for _ in range(3)))
    assert failed == [StorageUnavailable] * 3
    store.fail = False
    assert await checks.check(session_id, Offset(epoch, ids[0])) == ids[0]


async def test_a_subscriber_that_leaves_while_waiting_leaves_the_others_their_answers(
    checks: ResumeChecks, session_id: str
) -> None:
    epoch, ids = await write_texts(checks.store, session_id, "ab")
    staying = [asyncio.create_task(checks.check(session_id, Offset(epoch, ids[1]))) for _ in range(3)]
    leaving = asyncio.create_task(checks.check(session_id, Offset(epoch, ids[0])))
    await asyncio.sleep(0)  # all four waiting
    leaving.cancel()
    assert await asyncio.gather(*staying) == [ids[1]] * 3
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_no_offset_asks_the_session_node_alone(checks: ResumeChecks, session_id: str) -> None:
    assert await checks.check(session_id, None) == StreamId.ZERO
    assert calls(checks) == []
