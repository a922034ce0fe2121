"""Reference for the fan-out benchmark: `websockets.broadcast` of pre-encoded frames, no Redis, no relay logic.

    python -m bench.raw_broadcast --port 0 --ready-file F

Subscribers connect to any path; connections on one path form a group (a "session"). ``GET /start?rate=R&
seconds=S&frame_bytes=B`` broadcasts, for S seconds, R frames per second to every group (R = 0: as fast as
the subscribers drain), each frame built once per tick and sent with one `websockets.broadcast` call per
group; a tick it cannot make in time is skipped, not queued, so it sends what one core allows. A frame looks like a relay delta frame of B bytes whose content starts with the send time, so the
benchmark's client measures it exactly like the relay's. Same server settings as the relay (no compression,
same ping interval). ``GET /stats`` answers ``{"connections": n, "frames_sent": n, "busy": bool}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

from bench.fanout_client import TOKEN_CHARS, token_content
from tokenfan.runtime.serving import bound_url, install_stop_signals, write_ready_file

#: How much a connection may have buffered before a max-rate broadcast waits for it (bytes).
_HIGH_WATER = 65_536


def delta_frame(frame_bytes: int, seq: int, now_ns: int) -> bytes:
    """A frame shaped like a relay delta frame, padded (in its content) to about `frame_bytes`."""
    head = (
        '{"offset":"k3x9q2ab:1732412345678-0","type":"delta","session_id":"fan-0123456789ab",'
        f'"generation_id":"gen_01M85JSR67842W2YC56KNRN9TW","seq":{seq},"content":"'
    )
    tokens = max(1, (frame_bytes - len(head) - 2) // TOKEN_CHARS)
    return (head + token_content(now_ns) * tokens + '"}').encode()


class Broadcaster:
    def __init__(self) -> None:
        self.groups: dict[str, set[ServerConnection]] = {}
        self.frames_sent = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def connections(self) -> int:
        return sum(len(group) for group in self.groups.values())

    async def handle(self, websocket: ServerConnection) -> None:
        assert websocket.request is not None
        group = self.groups.setdefault(websocket.request.path, set())
        group.add(websocket)
        try:
            await websocket.wait_closed()
        finally:
            group.discard(websocket)

    def start(self, rate: float, seconds: float, frame_bytes: int) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(rate, seconds, frame_bytes))

    async def _run(self, rate: float, seconds: float, frame_bytes: int) -> None:
        groups = [list(group) for group in self.groups.values() if group]
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + seconds
        sent = 0  # broadcast calls so far (one per group per tick)
        total_rate = rate * len(groups)
        everyone = [c for group in groups for c in group]
        sample = everyone[:: max(1, len(everyone) // 64)]
        while loop.time() < deadline:
            if total_rate:
                due = int((loop.time() - started) * total_rate) - sent
                if due <= 0:
                    await asyncio.sleep(max(0.0, (sent + 1) / total_rate - (loop.time() - started)))
                    continue
                if due > len(groups):  # behind: skip the ticks it could not make rather than burst them
                    sent += due - len(groups)
                    due = len(groups)
            else:
                due = len(groups)
            frame = delta_frame(frame_bytes, sent, time.time_ns())
            for _ in range(due):
                group = groups[sent % len(groups)]
                broadcast(group, frame, text=True)
                self.frames_sent += len(group)
                sent += 1
            if not total_rate:
                await self._drain(sample)

    async def _drain(self, sample: list[ServerConnection]) -> None:
        """Max rate: yield to the loop, and wait while a sampled connection holds a large backlog."""
        await asyncio.sleep(0)
        for _ in range(2000):
            if all(_buffered(c) < _HIGH_WATER for c in sample):
                return
            await asyncio.sleep(0.001)

    def stats(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "frames_sent": self.frames_sent,
            "busy": self.task is not None and not self.task.done(),
        }


def _buffered(connection: ServerConnection) -> int:
    transport = connection.transport
    return transport.get_write_buffer_size() if transport is not None else 0


def _json(connection: ServerConnection, body: object) -> Response:
    return connection.respond(HTTPStatus.OK, json.dumps(body))


async def main(port: int, ready_file: str | None) -> None:
    broadcaster = Broadcaster()

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/stats":
            return _json(connection, broadcaster.stats())
        if url.path == "/start":
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            broadcaster.start(float(query["rate"]), float(query["seconds"]), int(query["frame_bytes"]))
            return _json(connection, {"started": True})
        return None

    stop = asyncio.Event()
    install_stop_signals(stop.set)
    async with serve(
        broadcaster.handle,
        "127.0.0.1",
        port,
        process_request=process_request,
        ping_interval=20,
        ping_timeout=20,
        max_size=65_536,
        max_queue=4,
        compression=None,
    ) as server:
        write_ready_file(ready_file, bound_url(next(iter(server.sockets)), "ws"), role="raw_broadcast")
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args.port, args.ready_file))
