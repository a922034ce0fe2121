"""Slow subscribers: a generation that floods them, and sockets whose back-pressure reaches the server soon.

The generation has three parts: one 400 KB piece, a 1.25 s trickle of tiny pieces, then 520 KB in 4 KB
pieces. A stalled subscriber joins during the trickle (resuming after the last offset a fast subscriber
saw, so it has almost nothing to catch up), stops reading its socket at once, and reads nothing more until
the generation is over. Its socket has a 4 KB receive buffer and a small MSS, so TCP back-pressure reaches
the server's write buffer after a little loopback buffering; joining late and quiet keeps that buffering
small (a connection that has carried a fast transfer gets kernel send buffers of megabytes, which would
absorb the flood). What the server holds for it therefore depends little on how much the kernel absorbed,
but not never: the kernel may take a burst mid-flood, the server then sees the subscriber drained, and one
that goes live again and falls behind again may earn a second snapshot (a correct one).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.support.requests import accept, user_message
from tests.support.waiting import Closer, wait_for_condition
from tests.support.watchers import Watcher, finished, http_url, stream_url

#: TOKENFAN_RELAY_MAX_BUFFER_BYTES of the servers under test.
LIMIT = 65_536
#: The generation's first piece: the stalled subscriber joins after it.
HEAD = 400_000


def flood(label: str) -> dict[str, Any]:
    """~920 KB: a 400 KB piece, 250 tiny pieces (1.25 s), then 130 pieces of 4 KB (0.65 s), at 200 pieces/s.

    The simulator has no option that makes long pieces out of a short request (`tokens` makes ~6 bytes per
    token, at ~10k tokens/s at best), so the pieces travel in the request, under the API's 1 MiB body
    limit. The pacing keeps each live batch the server writes small, so the bound measures the server."""
    pieces = ["h" * HEAD] + [f" t{n:03d}" for n in range(250)] + [f"{n:04d}" + "x" * 3996 for n in range(130)]
    return user_message(label, {"chunks": pieces, "rate": 200})


def content_length(frames: list[dict[str, Any]]) -> int:
    return sum(len(frame.get("content", "")) for frame in frames)


async def slow_socket(url: str) -> socket.socket:
    """A socket connected to `url`'s host and port, with a 4 KB receive buffer and a 536-byte MSS (so the
    server's kernel does not size its send buffer for 64 KB loopback segments)."""
    address = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (address.hostname, address.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def stalled_subscriber(opened: Closer, relay_url: str, session_id: str, after: str) -> ClientConnection:
    """A subscriber resuming after `after` that reads nothing from its socket until its transport's
    `resume_reading()`, on a `slow_socket` so that TCP back-pressure reaches the relay quickly."""
    sock = await slow_socket(relay_url)
    try:
        connection = await connect(
            stream_url(relay_url, session_id, after),
            sock=sock,
            max_queue=1,
            max_size=None,
            compression=None,
            ping_interval=None,  # while stalled it would not read the pong
            close_timeout=1,  # it may hold unread frames when a failed test closes it
        )
    except BaseException:
        sock.close()
        raise
    # Stop reading the socket outright: a one-message queue alone would still let the client library pull
    # in the rest of a large frame it has begun, draining the relay's buffer behind the test's back.
    connection.transport.pause_reading()
    return opened(connection)


async def largest_buffers_until(relay_url: str, done: asyncio.Event) -> list[int]:
    """Every `largest_write_buffer_bytes` the relay reports until `done`, and once more after it."""
    seen: list[int] = []
    async with httpx.AsyncClient(base_url=http_url(relay_url), timeout=10) as client:
        while True:
            finished_before = done.is_set()
            seen.append((await client.get("/stats")).json()["largest_write_buffer_bytes"])
            if finished_before:
                return seen
            await asyncio.sleep(0.01)  # paces the sampling; nothing waits on it


async def flood_while_stalled(
    opened: Closer, relay_url: str, api: httpx.AsyncClient, session_id: str, body: dict[str, Any]
) -> tuple[Watcher, int, ClientConnection, str, list[int]]:
    """A fast subscriber throughout, and a stalled one that joins after the generation's first piece; the
    generation runs to its end. Returns the fast one, how many of its frames precede the stalled one's
    position, the stalled one, the generation, and the relay's largest write buffer, sampled all through
    the stall."""
    fast = await opened(Watcher(relay_url, session_id)).connect()
    generation_id = await accept(api, session_id, body)
    await fast.receive_until(lambda frames: content_length(frames) >= HEAD)
    joined_at = len(fast.frames)
    stalled = await stalled_subscriber(opened, relay_url, session_id, after=fast.frames[-1]["offset"])
    done = asyncio.Event()
    sampler = asyncio.create_task(largest_buffers_until(relay_url, done))
    try:
        async with httpx.AsyncClient(base_url=http_url(relay_url), timeout=10) as client:

            async def both_live() -> bool:
                return int((await client.get("/stats")).json()["subscribers"]) == 2

            # It caught up (a few tiny frames) and joined the session's feed before the flood began.
            await wait_for_condition(both_live, timeout=5, interval=0.005)
        await fast.receive_until(finished(generation_id), timeout=30)
    finally:
        done.set()
        buffers = await sampler
    stalled.transport.resume_reading()
    return fast, joined_at, stalled, generation_id, buffers
