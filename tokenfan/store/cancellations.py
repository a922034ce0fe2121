"""The fast path of cancellation: every worker listens on one pub/sub channel for requests.

`Store.request_cancel` (and an interrupting `Store.accept`) publish ``<generation id> <reason>`` on
`CANCEL_CHANNEL`. Pub/sub is at-most-once, so this is only the fast path: every write result and every
lease renewal also carries the request, which covers a message lost while a worker was reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from tokenfan.contract.keys import CANCEL_CHANNEL
from tokenfan.store.boundary import count_failure
from tokenfan.store.connection import ANSWER_SECONDS
from tokenfan.store.topology import Topology

__all__ = ["listen_for_cancellations"]

log = structlog.get_logger("tokenfan.store.cancellations")

#: Seconds between two attempts to subscribe again after Redis failed under the listener.
_RECONNECT_DELAY = 0.5
#: The listener pings its node after this long without a message, and takes the next node once it has heard
#: nothing at all (not even the answer to a ping) for `ANSWER_SECONDS`: a node that hangs (stopped, or cut off
#: without a reset) sends no error, and would otherwise hold the fast path for good.
_PING_SECONDS = 1.0


async def listen_for_cancellations(topology: Topology, on_request: Callable[[str, str], object]) -> None:
    """Call ``on_request(generation_id, reason)`` for each cancellation request published, until cancelled.

    A classic channel: on a cluster, what one node publishes reaches every node, so any node will do; the
    listener takes the next one (with a fresh slot map) when its node fails. Survives Redis failures: it
    subscribes again and carries on (requests published meanwhile are lost here, and reach the worker
    through its next write or lease renewal instead); a node that stops answering is left after
    `ANSWER_SECONDS`. A request without a reason has the reason ``requested``."""
    turn = 0
    loop = asyncio.get_running_loop()
    while True:
        try:
            await topology.ready()  # a cluster client learns its nodes on its first command: none yet, maybe
            nodes = topology.primaries()
            redis = topology.client(nodes[turn % len(nodes)])
            turn += 1
            async with redis.pubsub() as pubsub:
                async with asyncio.timeout(ANSWER_SECONDS):  # a hung node accepts, then never answers AUTH
                    await pubsub.subscribe(CANCEL_CHANNEL)
                heard = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=_PING_SECONDS)
                    if message is None:
                        if loop.time() - heard > ANSWER_SECONDS:
                            raise TimeoutError(f"the node said nothing for {ANSWER_SECONDS:g} s")
                        await pubsub.ping()
                        continue
                    heard = loop.time()
                    if message.get("type") != "message":
                        continue  # a subscription's confirmation, a pong
                    generation_id, _, reason = message["data"].decode(errors="replace").partition(" ")
                    on_request(generation_id, reason or "requested")
        except (RedisError, OSError) as exc:
            count_failure("cancel_listener", exc)
            log.warning("cancel_listener_reconnecting", error=str(exc))
            await asyncio.sleep(_RECONNECT_DELAY)
            with contextlib.suppress(RedisError, OSError):
                await topology.refresh()
