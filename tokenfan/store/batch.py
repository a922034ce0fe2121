"""Many script calls at once: one pipeline per node, every node at the same time.

Each call's keys lie in one slot. On one Redis, all calls go in one pipeline. On a cluster, calls are
grouped by the node that serves their slot, and each group is pipelined on that node's own connection,
all nodes in parallel. A call a node refuses because its slot is elsewhere now (MOVED, ASK), or because
the cluster is settling (TRYAGAIN, CLUSTERDOWN, LOADING, READONLY after a failover), is sent again once the
slot map is reloaded; a node that cannot be reached sends its calls there too. Sending again is safe: every
script of the store is idempotent (by generation id, start token, attempt or seq).

A node has `ANSWER_SECONDS` to answer its pipeline. One that does not (hung, or cut off without a reset: a
partition) is treated as one that cannot be reached: its connection is dropped and its calls go again, to
whichever node the reloaded slot map names, so that once its replica is promoted they land there rather
than waiting on a dead connection for as long as TCP takes to give up (minutes). On one Redis the call
fails (`StorageUnavailable`), and its caller retries as it would after any outage.

A pipeline is one round trip. Calls go out as EVALSHA; a node that does not hold a script (a new node, a
failover, SCRIPT FLUSH) answers NOSCRIPT without running it, and those calls alone go again once the script
is loaded there. (redis-py's own pipeline would ask SCRIPT EXISTS first, on every execution: a second round
trip per node per flush.)

A call may come packed already: its arguments the whole command as bytes (`write_layout.packed_write`, the
worker's flush), and its keys only the first, to route it by. Such calls are written to a connection of the
node's pool as they are, and their replies read back, without redis-py's command layer: at hundreds of
generations per flush, packing every argument again there was a fifth of the flush's CPU.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenfan.store.connection import ANSWER_SECONDS
from tokenfan.store.slots import key_slot
from tokenfan.store.topology import Topology

__all__ = ["ScriptCall", "run_calls"]

#: One script call: the script, its keys (one slot), its arguments; or, packed, the script, its first key
#: and the whole ``EVALSHA`` command as RESP bytes.
ScriptCall = tuple[AsyncScript, Sequence[str], Sequence[Any] | bytes]

#: Replies that mean "not here, or not now": the call goes again after the slot map is reloaded.
_UNSETTLED = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "READONLY", "MASTERDOWN")
# About 3 s in all: a failover with a one-second node timeout fits. The pause doubles from 50 ms but stays
# at 250 ms, so that the calls land within a quarter of a second of a replica's promotion, not up to 1.6 s
# after it (measured by bench/failover.py).
_ROUNDS = 15
_BACKOFF = 0.05
_MAX_PAUSE = 0.25


async def run_calls(topology: Topology, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's reply, in order. Raises the first reply that is an error of the call itself, and a
    `RedisError` when the cluster does not settle (the store's boundary makes it `StorageUnavailable`)."""
    if not topology.is_cluster:
        replies = await _pipeline(topology, "single", calls)
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply
        return replies
    results: list[Any] = [None] * len(calls)
    pending = list(range(len(calls)))
    for round_ in range(_ROUNDS):
        pending = await _round(topology, calls, pending, results)
        if not pending:
            return results
        await asyncio.sleep(min(_BACKOFF * 2**round_, _MAX_PAUSE))
        await topology.refresh()
    raise RedisConnectionError(f"{len(pending)} script calls found no node to run them")


async def _round(
    topology: Topology, calls: Sequence[ScriptCall], pending: list[int], results: list[Any]
) -> list[int]:
    """Send every pending call once; returns the ones to send again."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index in pending:
        groups[topology.node_of(key_slot(calls[index][1][0]))].append(index)
    names = list(groups)
    outcomes = await asyncio.gather(
        *(_pipeline(topology, name, [calls[i] for i in groups[name]]) for name in names),
        return_exceptions=True,
    )
    again: list[int] = []
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, RedisConnectionError | RedisTimeoutError | OSError):
            again += groups[name]  # the node is away: its replica may be taking over
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        for index, reply in zip(groups[name], outcome, strict=True):
            if isinstance(reply, ResponseError) and str(reply).startswith(_UNSETTLED):
                again.append(index)
            elif isinstance(reply, RedisError):
                raise reply
            else:
                results[index] = reply
    return again


async def _pipeline(topology: Topology, name: str, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's reply (errors as exceptions among them), in one round trip to node `name`, and one more
    for the calls whose script the node did not hold."""
    async with asyncio.timeout(ANSWER_SECONDS):  # TimeoutError: an OSError, the node counts as away
        return await _answered(topology.client(name), calls)


async def _answered(client: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    replies = await _send(client, calls)
    missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
            await client.script_load(script.script)
        for index, reply in zip(missing, await _send(client, [calls[i] for i in missing]), strict=True):
            replies[index] = reply
    return replies


async def _send(client: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    packed = [args for _, _, args in calls if type(args) is bytes]
    if packed:
        if len(packed) != len(calls):
            raise ValueError("packed and unpacked script calls in one batch")
        return await _send_packed(client, packed)
    async with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies


async def _send_packed(client: Redis, commands: list[bytes]) -> list[Any]:
    """Each packed command's reply (an error reply as the exception it maps to), in one round trip. A
    connection that fails is dropped and the whole batch sent once more on a new one, as redis-py's own
    pipeline does: safe, since every script of the store is idempotent."""
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        try:
            return await _exchange(connection, commands)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await connection.disconnect(nowait=True)
            return await _exchange(connection, commands)  # it connects again
    except BaseException:
        # Replies may still be on their way (a cancelled flush): this connection must not serve another.
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


async def _exchange(connection: Any, commands: list[bytes]) -> list[Any]:
    await connection.send_packed_command(commands)
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as error:  # NOSCRIPT among them: the caller loads the script and resends
            replies.append(error)
    return replies
