"""Slow subscribers: a generation that floods them, and sockets whose back-pressure reaches the server soon.

The generation has three parts: one 400 KB piece, a 1.25 s trickle of tiny pieces, then 520 KB in 4 KB
pieces. A stalled subscriber joins during the trickle (resuming after the last offset a fast subscriber
saw, so it has almost nothing to catch up), stops reading its socket at once, and reads nothing more until
the generation is over. Its socket has a 4 KB receive buffer and a small MSS, so TCP back-pressure reaches
the server's write buffer after a little loopback buffering; joining late and quiet keeps that buffering
small (a connection that has carried a fast transfer gets kernel send buffers of megabytes, which would
absorb the flood). What the server holds for it therefore does not depend on how much the kernel absorbed.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import urlsplit

from tests.support.requests import user_message

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
