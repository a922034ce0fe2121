"""Appending to a session's stream: exactly once, fenced by attempt, batched across sessions, published."""

from __future__ import annotations

import asyncio
import itertools
import json

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.store.helpers import (
    USAGE,
    accept,
    completed,
    delta,
    deltas,
    make_store,
    queue_of,
    resolved,
    running,
    start_after_lease,
    stream_ids,
    stream_texts,
)
from tests.support.requests import new_session_id
from tokenfan.contract.events import EventType, GenerationStatus, StreamEntry, encode_body, event_body
from tokenfan.contract.keys import GenerationField, SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import EventWrite, Finish, StartOutcome, WriteItem, WriteOutcome, slot_of
from tokenfan.store.tail import LiveTail, Published
from tokenfan.store.writes import _write_result


async def test_write_appends_events_text_and_offsets(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "ab"))]
    )
    (more,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, [delta(session_id, generation_id, 3, "日本🎉")])]
    )
    assert result.outcome is WriteOutcome.OK
    assert (more.outcome, more.last_seq, more.status) == (WriteOutcome.OK, 3, "running")
    keys = SessionKeys(session_id)
    entries = await redis.xrange(keys.events)
    assert len(entries) == 3
    raw_epoch, _ = await store.tail(session_id)
    assert raw_epoch
    epoch = raw_epoch.decode()
    bodies = [json.loads(fields[b"d"]) for _, fields in entries]
    assert [body["seq"] for body in bodies] == [1, 2, 3]
    assert [body["content"] for body in bodies] == ["a", "b", "日本🎉"]
    assert all(fields[b"e"] == epoch.encode() for _, fields in entries)
    ids = [StreamId.parse(entry_id) for entry_id, _ in entries]
    assert ids == sorted(ids)
    assert result.last_offset == Offset(epoch, ids[1])
    assert more.last_offset == Offset(epoch, ids[2])
    assert await redis.get(keys.generation_text(generation_id)) == "ab日本🎉".encode()
    record = await store.generation(generation_id)
    assert record is not None
    assert record.text == "ab日本🎉"
    assert record.status is GenerationStatus.RUNNING
    assert record.first_offset == f"{epoch}:{ids[0]}"
    assert record.last_offset == f"{epoch}:{ids[2]}"
    assert await store.tail(session_id) == (epoch.encode(), ids[2])


async def test_a_retried_write_stores_each_event_once(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    item = WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "abc"))
    (first,) = await store.write([item])
    (retried,) = await store.write([item])
    assert first.outcome is WriteOutcome.OK
    assert retried.outcome is WriteOutcome.OK
    assert retried.last_seq == 3
    assert retried.last_offset == first.last_offset
    # A retry overlapping what is stored, with one new event at its end.
    overlap = WriteItem(
        session_id, generation_id, attempt, deltas(session_id, generation_id, "bcd", first_seq=2)
    )
    (extended,) = await store.write([overlap])
    assert extended.last_seq == 4
    assert await stream_texts(redis, session_id) == ["a", "b", "c", "d"]
    assert await redis.get(SessionKeys(session_id).generation_text(generation_id)) == b"abcd"


async def test_a_seq_gap_stops_the_write(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    events = [delta(session_id, generation_id, 1, "a"), delta(session_id, generation_id, 3, "c")]
    events.append(delta(session_id, generation_id, 4, "d"))
    (result,) = await store.write([WriteItem(session_id, generation_id, attempt, events)])
    assert result.outcome is WriteOutcome.GAP
    assert result.last_seq == 1
    assert await stream_texts(redis, session_id) == ["a"]
    assert await redis.get(SessionKeys(session_id).generation_text(generation_id)) == b"a"
    (repaired,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "bcd", first_seq=2))]
    )
    assert (repaired.outcome, repaired.last_seq) == (WriteOutcome.OK, 4)


async def test_a_stale_attempt_is_fenced(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    await store.write(
        [WriteItem(session_id, generation_id, attempt, [delta(session_id, generation_id, 1, "a")])]
    )
    await store.release_lease(session_id, generation_id, attempt)
    takeover = await store.start(session_id, generation_id)
    assert takeover.attempt == attempt + 1
    stale = WriteItem(
        session_id, generation_id, attempt, deltas(session_id, generation_id, "bc", first_seq=2)
    )
    (result,) = await store.write([stale])
    assert result.outcome is WriteOutcome.FENCED
    assert result.last_seq == 1
    assert result.last_offset is None
    stale_finish = WriteItem(
        session_id, generation_id, attempt, [], Finish(GenerationStatus.FAILED, None, None, {"type": "x"})
    )
    (refused,) = await store.write([stale_finish])
    assert refused.outcome is WriteOutcome.FENCED
    assert await stream_texts(redis, session_id) == ["a"]
    assert await redis.get(SessionKeys(session_id).generation_text(generation_id)) == b"a"
    record = await store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.RUNNING


def restarted(session_id: str, generation_id: str, seq: int, attempt: int) -> EventWrite:
    body = event_body(
        EventType.GENERATION_RESTARTED,
        session_id=session_id,
        generation_id=generation_id,
        seq=seq,
        attempt=attempt,
    )
    return EventWrite(seq, encode_body(body), restarts=1)


async def test_a_restart_clears_the_dead_attempts_output_in_the_call_that_appends_it(
    redis: Redis, session_id: str
) -> None:
    store = make_store(redis, lease_ms=50)
    generation_id, attempt = await running(store, session_id)
    thought = event_body(
        EventType.DELTA, session_id=session_id, generation_id=generation_id, seq=5, reasoning="hmm"
    )
    dead = [*deltas(session_id, generation_id, "dead"), EventWrite(5, encode_body(thought), "", "hmm")]
    calls = json.dumps([{"index": 0, "id": "call_1", "name": "f", "arguments": '{"a"'}])
    await store.write([WriteItem(session_id, generation_id, attempt, dead, tool_calls=calls)])
    takeover = await start_after_lease(store, session_id, generation_id)
    assert (takeover.outcome, takeover.last_seq) == (StartOutcome.RESTARTED, 5)

    # The restart alone: nothing of the first attempt is left, though the clean run has not begun.
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, takeover.attempt, [restarted(session_id, generation_id, 6, 2)])]
    )
    assert result.outcome is WriteOutcome.OK
    record = await store.generation(generation_id)
    assert record is not None
    assert (record.text, record.reasoning, record.tool_calls, record.seq) == ("", "", [], 6)

    clean = WriteItem(
        session_id, generation_id, takeover.attempt, deltas(session_id, generation_id, "ok", first_seq=7)
    )
    await store.write([clean])
    # The restart retried after an ambiguous failure: already stored, it clears nothing a second time.
    await store.write(
        [WriteItem(session_id, generation_id, takeover.attempt, [restarted(session_id, generation_id, 6, 2)])]
    )
    record = await store.generation(generation_id)
    assert record is not None
    assert (record.text, record.reasoning, record.tool_calls, record.seq) == ("ok", "", [], 8)
    snapshot = await store.snapshot(session_id, since=(await stream_ids(redis, session_id))[0])
    assert snapshot is not None
    assert [(view.text, view.reasoning, view.tool_calls) for view in snapshot.generations] == [("ok", "", [])]


async def test_a_restart_keeps_what_follows_it_in_the_same_call(redis: Redis, session_id: str) -> None:
    store = make_store(redis, lease_ms=50)
    generation_id, attempt = await running(store, session_id)
    await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "old"))]
    )
    takeover = await start_after_lease(store, session_id, generation_id)
    calls = json.dumps([{"index": 0, "id": "call_2", "name": "g", "arguments": "{}"}])
    events = [
        restarted(session_id, generation_id, 4, 2),
        *deltas(session_id, generation_id, "new", first_seq=5),
    ]
    await store.write([WriteItem(session_id, generation_id, takeover.attempt, events, tool_calls=calls)])
    record = await store.generation(generation_id)
    assert record is not None
    assert record.text == "new"
    assert record.tool_calls == json.loads(calls)


async def test_appending_before_start_is_fenced(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id = await accept(store, session_id)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, 0, deltas(session_id, generation_id, "a"))]
    )
    assert result.outcome is WriteOutcome.FENCED
    assert await redis.exists(SessionKeys(session_id).events) == 0


async def test_finish_completes_and_hands_over_to_the_next(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    next_id = await accept(store, session_id)
    events = [*deltas(session_id, generation_id, "hi"), completed(session_id, generation_id, 3, "hi")]
    finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
    item = WriteItem(session_id, generation_id, attempt, events, finish)
    (result,) = await store.write([item])
    assert result.outcome is WriteOutcome.OK
    assert result.status == "completed"
    assert result.next_generation_id == next_id
    assert result.last_seq == 3
    assert await queue_of(redis, session_id) == [next_id]
    record = await store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.COMPLETED
    assert record.finish_reason == "stop"
    assert record.usage == USAGE
    assert record.error is None
    assert record.text == "hi"
    assert record.finished_ms is not None
    ids = await stream_ids(redis, session_id)
    assert result.last_offset is not None
    assert result.last_offset.stream_id == ids[-1]
    # The same finish again, as after a connection lost mid-call: it already happened.
    (retried,) = await store.write([item])
    assert retried.outcome is WriteOutcome.OK
    assert retried.status == "completed"
    assert retried.next_generation_id == next_id
    assert await stream_ids(redis, session_id) == ids
    assert await queue_of(redis, session_id) == [next_id]
    for key in (SessionKeys(session_id).events, SessionKeys(session_id).generation_text(generation_id)):
        assert 0 < await resolved(redis.ttl(key)) <= 3600


async def test_failure_is_recorded_with_its_error(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    error = {"type": "upstream_timeout", "message": "stalled"}
    body = event_body(
        EventType.GENERATION_FAILED, session_id=session_id, generation_id=generation_id, seq=1, error=error
    )
    item = WriteItem(
        session_id,
        generation_id,
        attempt,
        [EventWrite(1, encode_body(body))],
        Finish(GenerationStatus.FAILED, None, None, error),
    )
    (result,) = await store.write([item])
    assert (result.outcome, result.status, result.next_generation_id) == (WriteOutcome.OK, "failed", None)
    record = await store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.FAILED
    assert record.error == error
    assert record.usage is None
    assert record.finish_reason is None


async def test_cancelling_a_queued_generation(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    first, _ = await running(store, session_id)
    queued = await accept(store, session_id)
    body = event_body(EventType.GENERATION_CANCELLED, session_id=session_id, generation_id=queued, seq=1)
    item = WriteItem(
        session_id, queued, 0, [EventWrite(1, encode_body(body))], Finish(GenerationStatus.CANCELLED)
    )
    (result,) = await store.write([item])
    assert (result.outcome, result.status) == (WriteOutcome.OK, "cancelled")
    assert result.next_generation_id == first
    assert await queue_of(redis, session_id) == [first]
    assert (await store.start(session_id, queued)).outcome is StartOutcome.TERMINAL


async def test_a_cancel_request_comes_back_with_each_write(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    (before,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "a"))]
    )
    assert before.cancel_requested == ""
    key = SessionKeys(session_id).generation(generation_id)
    await resolved(redis.hset(key, GenerationField.CANCEL_REQUESTED, "user"))
    (after,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, [delta(session_id, generation_id, 2, "b")])]
    )
    assert after.outcome is WriteOutcome.OK
    assert after.cancel_requested == "user"
    record = await store.generation(generation_id)
    assert record is not None
    assert record.cancel_requested == "user"


async def test_one_write_carries_several_sessions(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    other = new_session_id()
    first, first_attempt = await running(store, session_id)
    second, second_attempt = await running(store, other)
    results = await store.write(
        [
            WriteItem(session_id, first, first_attempt, deltas(session_id, first, "abc")),
            WriteItem(other, second, second_attempt, deltas(other, second, "z")),
        ]
    )
    assert [(r.outcome, r.last_seq) for r in results] == [(WriteOutcome.OK, 3), (WriteOutcome.OK, 1)]
    assert await stream_texts(redis, session_id) == ["a", "b", "c"]
    assert await stream_texts(redis, other) == ["z"]
    for result, session in zip(results, (session_id, other), strict=True):
        assert result.last_offset is not None
        assert result.last_offset.stream_id == (await stream_ids(redis, session))[-1]


async def test_cluster_mode_groups_by_slot_and_keeps_the_order(
    cluster_redis: Redis, cluster_client: RedisCluster, session_id: str
) -> None:
    redis = cluster_redis
    store = make_store(cluster_client)
    other = new_session_id()
    # A third session in the first one's slot: one session runs one generation at a time.
    neighbour = next(
        f"{session_id}-n{n}"
        for n in itertools.count()
        if slot_of(f"{session_id}-n{n}") == slot_of(session_id)
    )
    first, attempt_1 = await running(store, session_id)
    second, attempt_2 = await running(store, other)
    third, attempt_3 = await running(store, neighbour)
    results = await store.write(
        [
            WriteItem(session_id, first, attempt_1, deltas(session_id, first, "abc")),
            WriteItem(other, second, attempt_2, deltas(other, second, "z")),
            WriteItem(neighbour, third, attempt_3, deltas(neighbour, third, "pq")),
        ]
    )
    assert [(r.outcome, r.last_seq) for r in results] == [
        (WriteOutcome.OK, 3),
        (WriteOutcome.OK, 1),
        (WriteOutcome.OK, 2),
    ]
    assert await stream_texts(redis, session_id) == ["a", "b", "c"]
    assert await stream_texts(redis, neighbour) == ["p", "q"]
    assert await stream_texts(redis, other) == ["z"]


async def command_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def test_a_cluster_flush_sends_its_script_calls_and_nothing_else(
    cluster_redis: Redis, cluster_client: RedisCluster
) -> None:
    """One round trip per node and flush: the calls go out as EVALSHA, with no SCRIPT EXISTS before them
    (redis-py's pipeline asks it on every execution)."""
    store = make_store(cluster_client)
    # Every node holds the write script already, as it does for every process but a new cluster's first (a
    # node without it answers NOSCRIPT and the calls go again: the test after this one).
    await cluster_client.script_load(store.scripts.write.script)  # redis-py sends it to every primary
    sessions = [new_session_id() for _ in range(4)]
    started = [await running(store, session) for session in sessions]
    for first_seq in (1, 3):  # the first flush of a process, then one like any other
        items = [
            WriteItem(session, generation_id, attempt, deltas(session, generation_id, "ab", first_seq))
            for session, (generation_id, attempt) in zip(sessions, started, strict=True)
        ]
        before = await command_calls(cluster_redis)
        await store.write(items)
        after = await command_calls(cluster_redis)
        sent = {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}
        assert sent.get("evalsha") == len({slot_of(session) for session in sessions})
        assert "script|exists" not in sent
    for session in sessions:
        assert await stream_texts(cluster_redis, session) == ["a", "b", "a", "b"]


async def test_calls_a_node_ran_without_its_script_go_again_once_it_is_loaded(
    cluster_redis: Redis, cluster_client: RedisCluster
) -> None:
    store = make_store(cluster_client)
    sessions = [new_session_id() for _ in range(3)]
    started = [await running(store, session) for session in sessions]
    await cluster_redis.script_flush()  # as a node that has just joined, or a replica just promoted
    results = await store.write(
        [
            WriteItem(session, generation_id, attempt, deltas(session, generation_id, "xyz"))
            for session, (generation_id, attempt) in zip(sessions, started, strict=True)
        ]
    )
    assert [(result.outcome, result.last_seq) for result in results] == [(WriteOutcome.OK, 3)] * 3
    for session in sessions:
        assert await stream_texts(cluster_redis, session) == ["x", "y", "z"]  # each event once


async def test_lease_renewals_on_one_redis_ask_no_script_exists(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    await redis.script_flush()
    before = await command_calls(redis)
    assert await store.renew_leases([(session_id, generation_id, attempt)] * 2) == ["", ""]
    after = await command_calls(redis)
    assert after.get("script|exists", 0) == before.get("script|exists", 0)
    assert after["evalsha"] - before["evalsha"] == 4  # two refused for want of the script, then run


async def test_a_write_on_one_redis_loads_a_script_it_no_longer_holds(redis: Redis, session_id: str) -> None:
    """The flush's call goes out packed, past redis-py's script layer: NOSCRIPT is answered by loading it."""
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    await redis.script_flush()
    before = await command_calls(redis)
    (result,) = await store.write(
        [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "ab"))]
    )
    assert (result.outcome, result.last_seq) == (WriteOutcome.OK, 2)
    assert (await command_calls(redis))["evalsha"] - before.get("evalsha", 0) == 2  # refused, then run
    assert await stream_texts(redis, session_id) == ["a", "b"]


async def test_a_write_whose_connection_was_dropped_goes_out_on_a_new_one(
    redis: Redis, session_id: str
) -> None:
    """The packed call's own retry: a pooled connection the server closed (a restart, an idle timeout) costs
    the flush nothing but a reconnect."""
    own_client = Redis(**redis.connection_pool.connection_kwargs)
    try:
        store = make_store(own_client)
        generation_id, attempt = await running(store, session_id)
        await store.write(
            [WriteItem(session_id, generation_id, attempt, deltas(session_id, generation_id, "a"))]
        )
        await redis.client_kill_filter(_type="normal", skipme=True)  # the store's connection, not ours
        more = deltas(session_id, generation_id, "bc", first_seq=2)
        (result,) = await store.write([WriteItem(session_id, generation_id, attempt, more)])
        assert (result.outcome, result.last_seq) == (WriteOutcome.OK, 3)
        assert await stream_texts(redis, session_id) == ["a", "b", "c"]
    finally:
        await own_client.aclose()


async def test_each_append_is_published_with_its_predecessor(redis: Redis, session_id: str) -> None:
    store = make_store(redis)
    generation_id, attempt = await running(store, session_id)
    heard = Heard()
    tail = LiveTail(store.topology)
    try:
        await tail.watch(session_id, heard)
        await asyncio.wait_for(heard.subscribed.wait(), 10)
        one = [delta(session_id, generation_id, 1, "a")]
        two = deltas(session_id, generation_id, "bc", first_seq=2)
        await store.write([WriteItem(session_id, generation_id, attempt, one)])
        await store.write([WriteItem(session_id, generation_id, attempt, two)])
        async with asyncio.timeout(10):
            while len(heard.entries) < 3:
                await heard.more.wait()
                heard.more.clear()
    finally:
        await tail.close()
    epoch, _ = await store.tail(session_id)
    assert epoch is not None
    ids = await stream_ids(redis, session_id)
    bodies = [event.body.encode() for event in one + two]
    expected_prev = [StreamId.ZERO, ids[0], ids[1]]  # a fresh session's stream starts after 0-0
    assert heard.entries == [
        (StreamEntry(entry_id, epoch, body), previous)
        for previous, entry_id, body in zip(expected_prev, ids, bodies, strict=True)
    ]
    assert len({id(entry.epoch) for entry, _ in heard.entries}) == 1  # one object, however many entries


class Heard:
    """A live-tail listener that keeps what it hears."""

    def __init__(self) -> None:
        self.subscribed = asyncio.Event()
        self.more = asyncio.Event()
        self.entries: list[Published] = []

    def on_subscribed(self) -> None:
        self.subscribed.set()

    def on_published(self, entries: list[Published]) -> None:
        self.entries += entries
        self.more.set()


def test_the_common_reply_reads_back_as_its_full_form() -> None:
    """write.lua answers a generation written and still running with one string: the same result."""
    full = [b"ok", b"abcd1234", b"1796404719348-0", b"12", b"", b"", b"running"]
    assert _write_result(b"abcd1234 1796404719348-0 12") == _write_result(full)
    assert _write_result("abcd1234 0-0 0") == _write_result(["ok", "abcd1234", "0-0", 0, "", "", "running"])
