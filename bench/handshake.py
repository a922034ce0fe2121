"""What a WebSocket connection costs a server built on `websockets` before any of our work: the floor under a
resume storm's cost per resumer (issue 15).

    ./dev bench handshake [--storms 30] [--runs 3] [--output handshake]
    python -m bench.handshake ...

Two servers that do nothing but accept a connection, send one small text message and answer the client's
close, each in a process of its own, side by side, alternating run by run:

* ``asyncio``: `websockets.asyncio.server.serve`, configured as the relay is (no compression, the relay's
  origins, accept queue and keepalive);
* ``sans-io``: websockets' own protocol core (`websockets.server.ServerProtocol`) under a plain
  `asyncio.Protocol`, with no task, queue or keepalive per connection: the least a server on this library
  can do.

The load generator opens 100 connections at once (raw sockets: a request, the 101 and the message, then a
masked close), waits for every close to be answered, and asks the server for its own CPU time before and
after. Reported per server: CPU µs per connection, the median of the storms past the first three, per run.
Saved in ``bench/results/handshake.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import time
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Origin

from bench.harness import log, save

CONNECTIONS = 100
HELLO = '{"type":"hello"}'
ORIGINS: list[Origin | None] = [None, Origin("http://localhost")]
_REQUEST = (
    "GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
#: A client's close frame, code 1000, masked with the key b"abcd".
_CLOSE = b"\x88\x82abcd" + bytes([0x03 ^ ord("a"), 0xE8 ^ ord("b")])


class _SansIO(asyncio.Protocol):
    """One connection served by websockets' protocol core alone."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.protocol = ServerProtocol(origins=ORIGINS)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Request):
                response = protocol.accept(event)
                protocol.send_response(response)
                if response.status_code == 101:
                    protocol.send_text(HELLO.encode())
        self.transport.writelines(protocol.data_to_send())
        if protocol.close_expected():
            self.transport.close()


async def _hello(websocket: ServerConnection) -> None:
    await websocket.send(HELLO)
    await websocket.wait_closed()


async def serve_until_told(kind: str) -> None:
    """Serve as `kind`; print the port, then the process's CPU seconds for each line "cpu" on stdin (until
    it is killed)."""
    loop = asyncio.get_running_loop()
    if kind == "sans-io":
        server: Any = await loop.create_server(_SansIO, "127.0.0.1", 0, backlog=4096)
    else:
        server = await serve(
            _hello,
            "127.0.0.1",
            0,
            compression=None,
            max_queue=4,
            backlog=4096,
            origins=ORIGINS,
            ping_interval=20,
        )
    print(server.sockets[0].getsockname()[1], flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "cpu":
        print(f"{time.process_time():.6f}", flush=True)


async def _connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_REQUEST.format(port=port, key=base64.b64encode(os.urandom(16)).decode()).encode())
    received = b""
    while HELLO.encode() not in received:
        chunk = await reader.read(65536)
        if not chunk:
            raise RuntimeError("the server closed before its message")
        received += chunk
    return reader, writer


class _Server:
    """A server of `kind` in a process of its own (this file, ``--serve``), asked for its CPU time."""

    def __init__(self, kind: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._ask(None))

    def _ask(self, line: str | None) -> str:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        if line is not None:
            stdin.write(line + "\n")
            stdin.flush()
        return stdout.readline()

    def cpu(self) -> float:
        return float(self._ask("cpu"))

    def stop(self) -> None:
        self.process.kill()  # it holds nothing worth a graceful stop
        self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


async def storms(kind: str, count: int) -> float:
    """CPU µs per connection of a `kind` server over `count` storms (the median, past the first three)."""
    server = _Server(kind)
    costs = []
    try:
        for _ in range(count):
            before = server.cpu()
            connections = await asyncio.gather(*(_connection(server.port) for _ in range(CONNECTIONS)))
            for _, writer in connections:
                writer.write(_CLOSE)
            for reader, writer in connections:
                async with asyncio.timeout(5):
                    await reader.read()  # the server's close, then EOF
                writer.close()
            costs.append((server.cpu() - before) / CONNECTIONS * 1e6)
    finally:
        server.stop()
    return statistics.median(costs[3:])


async def main(args: argparse.Namespace) -> None:
    runs: dict[str, list[float]] = {"asyncio": [], "sans-io": []}
    for number in range(args.runs):
        order = list(runs) if number % 2 == 0 else list(runs)[::-1]
        for kind in order:
            runs[kind].append(round(await storms(kind, args.storms), 1))
            log(f"run {number + 1}, {kind}: {runs[kind][-1]} CPU-µs per connection")
    result = {
        "command": "./dev bench handshake " + " ".join(sys.argv[1:]),
        "connections_per_storm": CONNECTIONS,
        "storms_per_run": args.storms,
        "cpu_us_per_connection": runs,
    }
    log(f"saved {save(args.output, result)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--storms", type=int, default=30, help="storms of 100 connections per run (default 30)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per server, alternating (default 3)")
    parser.add_argument("--output", default="handshake", help="results name (bench/results/NAME.json)")
    parser.add_argument("--serve", choices=["asyncio", "sans-io"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        asyncio.run(serve_until_told(arguments.serve))
    else:
        asyncio.run(main(arguments))
