"""The Lua scripts: each file states its contract, and no script touches a key it was not given.

Redis Cluster sends a script call to the node owning the slot of its KEYS, and a script reaching for any
other key would fail there, or, on a node that happens to hold it, act on it outside the atomic unit the
call claims. A cluster node does not check this itself: it refuses declared KEYS that span slots, and a
script's access across slots, but not a key of the right slot that a script built from a name it was given.
So these tests watch every command the scripts run (MONITOR) on a cluster-mode node while the store goes
through every script, and compare each key with what the call declared.
"""

from __future__ import annotations

import itertools
from importlib import resources

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.store.helpers import REQUEST, USAGE, completed, deltas, make_store
from tests.store.monitor import ScriptCall, ScriptMonitor
from tests.support.requests import new_session_id
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import CANCEL_CHANNEL, StreamKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import AcceptOutcome, Finish, StartOutcome, Store, WriteItem, WriteOutcome
from tokenfan.store.scripts import SOURCES, Scripts
from tokenfan.store.streams import Producer


def test_each_script_file_opens_with_its_keys_argv_and_reply() -> None:
    folder = resources.files("tokenfan.store").joinpath("lua")
    files = {entry.name.removesuffix(".lua"): entry.read_text() for entry in folder.iterdir()}
    # Every script is loaded; common.lua and ds_common.lua hold shared helpers.
    assert set(files) == {*SOURCES, "common", "ds_common"}
    for name in SOURCES:
        header = list(itertools.takewhile(lambda line: line.startswith("--"), files[name].splitlines()))
        for part in ("KEYS:", "ARGV:", "Reply:"):
            assert any(line.startswith(f"-- {part}") for line in header), (
                f"{name}.lua does not state its {part}"
            )


async def test_every_key_a_script_touches_is_one_it_was_given(
    cluster_redis: Redis, cluster_client: RedisCluster
) -> None:
    """The proof for every script, through the store's own calls: each command each script ran touched
    only keys of its call's KEYS, and published only on a channel of its KEYS or the global cancellation
    channel. The node, in cluster mode, also refused nothing: each call's KEYS share one slot."""
    store = make_store(cluster_client)
    for source in SOURCES.values():
        await cluster_redis.script_load(source)  # or each script's first call shows up twice (NOSCRIPT)
    monitor = ScriptMonitor(cluster_redis)
    await monitor.start()
    await _every_script(store)
    await _every_stream_script(store)
    calls = await monitor.stop()
    names = {getattr(store.scripts, name).sha: name for name in Scripts.__slots__}
    assert {names[call.sha] for call in calls} == set(SOURCES)  # every script ran at least once
    for call in calls:
        assert await _undeclared(cluster_redis, call) == [], f"{names[call.sha]}.lua"


async def test_the_check_sees_a_key_a_script_builds(cluster_redis: Redis) -> None:
    """The check above can fail: a script that derives a key from one it was given is caught, though the
    cluster node itself runs it without complaint (the derived key is in the same slot)."""
    session_key = f"tf:{{{new_session_id()}}}:meta"
    builds = cluster_redis.register_script("return redis.call('GET', KEYS[1] .. ':derived')")
    await cluster_redis.script_load(builds.script)
    monitor = ScriptMonitor(cluster_redis)
    await monitor.start()
    await builds(keys=[session_key])
    (call,) = await monitor.stop()
    assert await _undeclared(cluster_redis, call) == [f"{session_key}:derived".encode()]


async def _undeclared(redis: Redis, call: ScriptCall) -> list[bytes]:
    """The keys (and channels) the call's commands touched that its KEYS did not name."""
    touched: list[bytes] = []
    for command in call.commands:
        if command[0].lower() == b"publish":  # a classic channel: the global cancellation one only
            if command[1] != CANCEL_CHANNEL.encode():
                touched.append(command[1])
        elif command[0].lower() == b"spublish":  # a shard channel lies in a slot, like a key
            touched.append(command[1])
        elif command[0].lower() == b"time":  # the Durable Streams scripts' clock: no key at all
            continue
        else:
            touched += [key.encode() for key in await redis.command_getkeys(*command)]  # it decodes them
    return [key for key in touched if key not in call.keys]


async def _every_script(store: Store) -> None:
    """Each script, and each branch of it that reads or writes a key the others do not."""
    session_id, other = new_session_id(), new_session_id()
    first, second, third = new_generation_id(), new_generation_id(), new_generation_id()
    await store.accept(session_id, first, request=REQUEST, model="m")
    await store.accept(session_id, second, request=REQUEST, model="m", idempotency_key="k")
    replayed = await store.replay(session_id, "k", request=REQUEST)
    assert replayed is not None
    assert replayed.outcome is AcceptOutcome.DUPLICATE
    reused = await store.accept(session_id, third, request={}, model="m", idempotency_key="k")
    assert reused.outcome is AcceptOutcome.REUSED
    refused = await store.accept(session_id, new_generation_id(), request=REQUEST, model="m", policy="reject")
    assert refused.outcome is AcceptOutcome.CONFLICT
    started = await store.start(session_id, first)
    assert started.outcome is StartOutcome.STARTED
    (written,) = await store.write(
        [WriteItem(session_id, first, started.attempt, deltas(session_id, first, "ab"))]
    )
    await store.renew_leases([(session_id, first, started.attempt)])
    await store.request_cancel(session_id, second, "requested")
    interrupting = await store.accept(session_id, third, request=REQUEST, model="m", policy="interrupt")
    assert interrupting.queue_position == 2
    done = [completed(session_id, first, 3, "ab")]
    finish = Finish(GenerationStatus.COMPLETED, "stop", USAGE, None)
    (finished,) = await store.write([WriteItem(session_id, first, started.attempt, done, finish)])
    assert finished.outcome is WriteOutcome.OK
    assert written.last_offset is not None
    await store.snapshot(session_id)
    await store.generation(first)
    await store.snapshot(session_id, since=written.last_offset.stream_id)
    await store.check_resume(session_id, Offset(written.last_offset.epoch, written.last_offset.stream_id))
    await store.read_after(session_id, written.last_offset.stream_id, 10)
    await store.read_before(session_id, written.last_offset.stream_id, 10)
    await store.rate_limit(new_session_id(), 60)
    elsewhere = new_generation_id()
    await store.accept(other, elsewhere, request=REQUEST, model="m")
    took = await store.start(other, elsewhere)
    next_up = await store.start(session_id, third)
    items = [WriteItem(other, elsewhere, took.attempt, deltas(other, elsewhere, "z"))]
    items.append(WriteItem(session_id, third, next_up.attempt, deltas(session_id, third, "y")))
    await store.write(items)  # two sessions, most likely in two slots: one call per slot
    await store.release_lease(other, elsewhere, took.attempt)


async def _every_stream_script(store: Store) -> None:
    """The Durable Streams scripts and the app events' one: a stream made, appended to by a producer and
    closed, forked (the fork copies, the source counts it), deleted while forked, released by its fork."""
    source, fork = StreamKeys(f"scripts/{new_session_id()}"), StreamKeys(f"scripts/{new_session_id()}/fork")
    fields = {"ct": "text/plain", "ctn": "text/plain", "ttl": "60"}
    tail = await store.create_stream(source, fields, last=StreamId.ZERO, closed=False, copied=[], own=[b"a"])
    assert tail is not None
    producer = Producer("p", 0, 0)
    ok = await store.append_stream(
        source, media_type="text/plain", data=b"b", close=False, stream_seq="1", producer=producer
    )
    assert ok[0] == "ok"
    await store.stream_meta(source, touch=True)
    assert (await store.delete_stream(source, "retain"))[0] == "kept"
    copied = await store.inherited(source, StreamId.parse(ok[1]))
    made = await store.create_stream(
        fork, fields, last=StreamId.parse(ok[1]), closed=True, copied=copied, own=[b"c"]
    )
    assert made is not None
    closing = await store.append_stream(
        source, media_type="", data=b"", close=True, stream_seq=None, producer=Producer("p", 0, 1)
    )
    assert closing[0] == "ok"
    assert (await store.delete_stream(source, "delete"))[0] == "soft"
    assert (await store.delete_stream(fork, "delete"))[0] == "deleted"
    assert (await store.delete_stream(source, "release"))[0] == "deleted"
    session_id = new_session_id()
    bodies = [('{"type":"x.note","session_id":"' + session_id + '","generation_id":"app","seq":', "}")]
    assert (await store.append_app_events(session_id, bodies, Producer("app", 0, 0)))[0] == "ok"
