"""A storm of reconnects: a relay that restarts, or stalls for a moment, finds every subscriber it had
knocking at once. The kernel holds their connections until the relay accepts them, as many as its accept
queue allows; past that it drops their SYNs, and each of those clients waits a second or more for its
retransmission before it even reaches the relay."""

from __future__ import annotations

import asyncio
import signal
from urllib.parse import urlsplit

import pytest

from tests.support.stack import RunningStack
from tokenfan.cli.embedded_redis import EmbeddedRedis

#: More clients than asyncio's default accept queue (100) holds, fewer than the relay's.
STORM = 300


async def _connect_all(host: str, port: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(STORM)))


async def _healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    return await reader.readuntil(b"ok\n")


@pytest.mark.fault
async def test_a_frozen_relay_still_has_every_reconnecting_client_queued_and_then_serves_them_all(
    redis_server: EmbeddedRedis,
) -> None:
    stack = RunningStack(redis_url=redis_server.url)
    try:
        relay = stack.spawn("relay")
        url = urlsplit(await asyncio.to_thread(relay.wait_ready))
        assert url.hostname is not None
        assert url.port is not None
        relay.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]  # busy, or not yet accepting
        try:
            # Only the kernel answers now: a connection completes only if the accept queue has room. With a
            # queue of 100, two hundred of these would wait for SYN retransmissions for as long as the relay
            # is frozen, and this would time out.
            async with asyncio.timeout(15):
                connections = await _connect_all(url.hostname, url.port)
        finally:
            relay.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        async with asyncio.timeout(30):
            answers = await asyncio.gather(*(_healthz(reader, writer) for reader, writer in connections))
        assert len(answers) == STORM
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
        for _, writer in connections:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in connections), return_exceptions=True)
    finally:
        stack.stop()
