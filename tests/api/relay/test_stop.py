"""A relay asked to stop (SIGTERM) stops at once, whatever connections it has: its WebSocket subscribers are
closed gracefully (1001, going away), and connections that never became WebSockets do not hold it up."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from tests.support.requests import new_session_id
from tests.support.stack import RunningStack
from tests.support.waiting import Closer
from tests.support.watchers import Watcher
from tokenfan.cli.embedded_redis import EmbeddedRedis

#: How long the stop may take here: well under websockets' 10 s timeouts, which is what it used to wait for
#: an idle connection; the relay is SIGKILLed past it (and the test fails).
STOP_WITHIN = 5.0


async def test_a_relay_stops_at_once_despite_idle_connections_and_closes_its_subscribers_gracefully(
    redis_server: EmbeddedRedis, opened: Closer
) -> None:
    stack = RunningStack(redis_url=redis_server.url)
    writers: list[asyncio.StreamWriter] = []
    try:
        relay = stack.spawn("relay")
        relay_url = await asyncio.to_thread(relay.wait_ready)
        url = urlsplit(relay_url)
        assert url.hostname is not None
        assert url.port is not None
        # A client that connected and has sent nothing yet, then a probe that keeps its connection open
        # after its answer. The relay accepts in order, so the probe's answer says both were accepted.
        _, silent = await asyncio.open_connection(url.hostname, url.port)
        reader, probe = await asyncio.open_connection(url.hostname, url.port)
        writers += [silent, probe]
        probe.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        subscriber = await opened(Watcher(relay_url, new_session_id())).connect()
        assert await asyncio.to_thread(relay.stop, STOP_WITHIN) == 0
        assert subscriber.connection is not None
        await subscriber.connection.wait_closed()
        assert subscriber.connection.close_code == 1001
    finally:
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        stack.stop()
