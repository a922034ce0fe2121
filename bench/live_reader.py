"""The measuring reader of the worker benchmark: sees every appended entry on pub/sub, in its own process.

    python -m bench.live_reader --redis-url URL --out DIR --sessions PREFIX:N [--probe-ms 10] [--ready-file F]

``SSUBSCRIBE`` to the live channel of each session ``PREFIX0`` … ``PREFIX{N-1}`` (shard channels have no
patterns) on a raw connection parsed by hiredis (the WRITE script ``SPUBLISH``es every appended entry as
``<epoch> <prev-id> <id> <body JSON>``). Each token the bench upstream sends carries its send time
(``" <time_ns>"`` in the delta's content; a delta may carry several tokens), so for every token this records
its send time and its latency: the time this process received it minus the send time (one wall clock, one
machine). The receive time is taken once per socket read, before parsing.

The reader must not be the bottleneck it measures, so it also reports its own lag: every ``probe-ms`` it
``SPUBLISH``es its current time on ``tf:{probe}:live`` from a second connection and records how long the message
takes to come back through the same subscription: Redis and this reader's own queueing, with no worker
involved. Probe publishes are counted, so the bench can subtract them from Redis's command counts.

On SIGTERM it writes ``tokens.bin`` and ``probes.bin`` (int64 pairs: send ns, latency ns), ``events.json`` (generation
lifecycle events with their receive times) and ``summary.json`` into ``--out``, then exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import signal
import time
from array import array
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis

from tokenfan.contract.keys import SessionKeys
from tokenfan.runtime.serving import write_ready_file

PROBE_CHANNEL = b"tf:{probe}:live"
_CONTENT = b'"content":"'
_TYPE = b'"type":"'


def _command(*parts: bytes) -> bytes:
    out = b"*%d\r\n" % len(parts)
    for part in parts:
        out += b"$%d\r\n%b\r\n" % (len(part), part)
    return out


class Recorder(asyncio.Protocol):
    """The subscription: parses pmessages as they arrive and records what they carry."""

    def __init__(self, channels: list[bytes]) -> None:
        self.channels = channels
        self.confirmed = 0
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.subscribed = asyncio.Event()
        self.tokens = array("q")  # send ns, latency ns, interleaved
        self.probes = array("q")  # probe send ns, latency ns, interleaved
        self.messages = 0
        self.deltas = 0
        self.other_types: dict[str, int] = {}
        self.lifecycle: list[tuple[int, str]] = []  # (receive ns, event type) for generation.* events
        self.busy_ns = 0  # time spent parsing (inside data_received)
        self.reads = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # One channel per command: a shard subscription's channels must share a slot on a cluster.
        self.transport.write(b"".join(_command(b"SSUBSCRIBE", channel) for channel in self.channels))

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        started = time.perf_counter_ns()
        self.reads += 1
        self.reader.feed(data)
        tokens, probes = self.tokens, self.probes
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            if not isinstance(reply, list) or reply[0] != b"smessage":
                if isinstance(reply, list) and reply[0] == b"ssubscribe":
                    self.confirmed += 1
                    if self.confirmed == len(self.channels):
                        self.subscribed.set()
                continue
            channel, payload = reply[1], reply[2]
            if channel == PROBE_CHANNEL:
                sent = int(payload)
                probes.append(sent)
                probes.append(now - sent)
                continue
            self.messages += 1
            body = payload.split(b" ", 3)[3]
            at = body.find(_CONTENT)
            if at >= 0:
                self.deltas += 1
                start = at + len(_CONTENT)
                for piece in body[start : body.index(b'"', start)].split():
                    sent = int(piece)
                    tokens.append(sent)
                    tokens.append(now - sent)
                continue
            at = body.find(_TYPE) + len(_TYPE)
            kind = body[at : body.index(b'"', at)].decode()
            self.other_types[kind] = self.other_types.get(kind, 0) + 1
            if kind.startswith("generation."):
                self.lifecycle.append((now, kind))
        self.busy_ns += time.perf_counter_ns() - started

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def probe(host: str, port: int, interval: float, counter: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    parser = hiredis.Reader()
    try:
        while True:
            await asyncio.sleep(interval)
            writer.write(_command(b"SPUBLISH", PROBE_CHANNEL, b"%d" % time.time_ns()))
            counter[0] += 1
            while parser.gets() is False:
                parser.feed(await reader.read(4096))
    finally:
        writer.close()


async def run(
    redis_url: str, channels: list[bytes], probe_ms: float, ready_file: str | None
) -> tuple[Recorder, int]:
    """Record until SIGTERM; returns the recorder and how many probes were published."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    parts = urlsplit(redis_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    _, recorder = await loop.create_connection(lambda: Recorder(channels), host, port)
    await asyncio.wait_for(recorder.subscribed.wait(), 10)
    probes_sent = [0]
    prober = asyncio.create_task(probe(host, port, probe_ms / 1000, probes_sent))
    write_ready_file(ready_file, redis_url, role="live_reader")
    await stop.wait()
    prober.cancel()
    return recorder, probes_sent[0]


def save(recorder: Recorder, probes_sent: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tokens.bin").open("wb") as file:
        recorder.tokens.tofile(file)
    with (out / "probes.bin").open("wb") as file:
        recorder.probes.tofile(file)
    (out / "events.json").write_text(json.dumps(recorder.lifecycle))
    summary: dict[str, Any] = {
        "messages": recorder.messages,
        "delta_messages": recorder.deltas,
        "tokens": len(recorder.tokens) // 2,
        "other_types": recorder.other_types,
        "probes_sent": probes_sent,
        "probes_received": len(recorder.probes) // 2,
        "socket_reads": recorder.reads,
        "parse_seconds": recorder.busy_ns / 1e9,
    }
    (out / "summary.json").write_text(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--sessions",
        required=True,
        help="PREFIX:N: the sessions PREFIX0 … PREFIX{N-1}, whose live channels to hear",
    )
    parser.add_argument("--probe-ms", type=float, default=10.0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    prefix, count = args.sessions.rsplit(":", 1)
    channels = [PROBE_CHANNEL] + [SessionKeys(f"{prefix}{n}").live.encode() for n in range(int(count))]
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        recorder, probes_sent = runner.run(run(args.redis_url, channels, args.probe_ms, args.ready_file))
    save(recorder, probes_sent, Path(args.out))


if __name__ == "__main__":
    main()
