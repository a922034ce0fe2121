"""The measuring reader of the worker benchmark: sees every appended entry on pub/sub, in its own process.

    python -m bench.live_reader --redis-url URL --sessions-prefix P --sessions N --out DIR [--cluster]
        [--probe-ms 10] [--ready-file F]

The WRITE script publishes every appended entry with ``SPUBLISH`` on its session's shard channel
(``tf:{S}:live``) as ``<epoch> <prev-id> <id> <body JSON>``. Shard channels take no patterns, so the reader is
told the sessions to expect (``P0`` .. ``P<N-1>``) and ``SSUBSCRIBE``s each channel on a raw connection parsed
by hiredis: one connection to one Redis, or, with ``--cluster`` (``--redis-url`` any node), one per primary,
each holding the channels of the slots it serves (``CLUSTER SLOTS``), as a relay does. Each token the bench
upstream sends carries its send time (``" <time_ns>"`` in the delta's content; a delta may carry several
tokens), so for every token this records its send time and its latency: the time this process received it
minus the send time (one wall clock, one machine). The receive time is taken once per socket read, before
parsing.

The reader must not be the bottleneck it measures, so it also reports its own lag: every ``probe-ms`` it
``SPUBLISH``es its current time on a probe channel of each node (``tf:{probe-K}:live``, K chosen so that the
channel's slot is that node's) from a second connection, and records how long the message takes to come back
through the same subscription: Redis and this reader's own queueing, with no worker involved. Probe publishes
are counted, so the bench can subtract them from Redis's command counts.

On SIGTERM it writes ``tokens.bin`` and ``probes.bin`` (int64 pairs: send ns, latency ns), ``events.json``
(generation lifecycle events with their receive times) and ``summary.json`` into ``--out``, then exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import functools
import json
import signal
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis

from tokenfan.contract.keys import SessionKeys
from tokenfan.runtime.serving import write_ready_file
from tokenfan.store.slots import SLOTS, key_slot

_CONTENT = b'"content":"'
_TYPE = b'"type":"'


def _command(*parts: bytes) -> bytes:
    out = b"*%d\r\n" % len(parts)
    for part in parts:
        out += b"$%d\r\n%b\r\n" % (len(part), part)
    return out


@dataclass
class Tally:
    """What every subscription connection of the reader records, together."""

    tokens: array[int] = field(default_factory=lambda: array("q"))  # send ns, latency ns, interleaved
    probes: array[int] = field(default_factory=lambda: array("q"))  # probe send ns, latency ns
    messages: int = 0
    deltas: int = 0
    other_types: dict[str, int] = field(default_factory=dict)
    lifecycle: list[tuple[int, str]] = field(default_factory=list)  # (receive ns, generation.* type)
    busy_ns: int = 0  # time spent parsing (inside data_received)
    reads: int = 0


@dataclass(frozen=True)
class Node:
    """A node to subscribe on: its address, its channels and its probe channel."""

    host: str
    port: int
    channels: list[bytes]
    probe: bytes


class Recorder(asyncio.Protocol):
    """One subscription connection: parses smessages as they arrive and records what they carry."""

    def __init__(self, tally: Tally, node: Node) -> None:
        self.tally = tally
        self.node = node
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.subscribed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # One channel per SSUBSCRIBE: a cluster refuses several channels of different slots in one.
        channels = [*self.node.channels, self.node.probe]
        self.transport.write(b"".join(_command(b"SSUBSCRIBE", channel) for channel in channels))

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        started = time.perf_counter_ns()
        tally = self.tally
        tally.reads += 1
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            if not isinstance(reply, list) or reply[0] != b"smessage":
                confirmed = isinstance(reply, list) and reply[0] == b"ssubscribe"
                if confirmed and reply[2] == len(self.node.channels) + 1:
                    self.subscribed.set()
                continue
            channel, payload = reply[1], reply[2]
            if channel == self.node.probe:
                sent = int(payload)
                tally.probes.append(sent)
                tally.probes.append(now - sent)
                continue
            self.record(tally, payload, now)
        tally.busy_ns += time.perf_counter_ns() - started

    @staticmethod
    def record(tally: Tally, payload: bytes, now: int) -> None:
        tally.messages += 1
        body = payload.split(b" ", 3)[3]
        at = body.find(_CONTENT)
        if at >= 0:
            tally.deltas += 1
            start = at + len(_CONTENT)
            for piece in body[start : body.index(b'"', start)].split():
                sent = int(piece)
                tally.tokens.append(sent)
                tally.tokens.append(now - sent)
            return
        at = body.find(_TYPE) + len(_TYPE)
        kind = body[at : body.index(b'"', at)].decode()
        tally.other_types[kind] = tally.other_types.get(kind, 0) + 1
        if kind.startswith("generation."):
            tally.lifecycle.append((now, kind))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def _ask(host: str, port: int, *parts: bytes) -> Any:
    """One command on a fresh connection, its reply parsed."""
    reader, writer = await asyncio.open_connection(host, port)
    parser = hiredis.Reader()
    try:
        writer.write(_command(*parts))
        while (reply := parser.gets()) is False:
            parser.feed(await reader.read(65536))
        return reply
    finally:
        writer.close()


async def nodes(redis_url: str, cluster: bool, prefix: str, sessions: int) -> list[Node]:
    """The nodes to subscribe on, each with the channels of the sessions whose slots it serves."""
    parts = urlsplit(redis_url.split(",")[0])
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = {(host, port): [(0, SLOTS - 1)]}
    if cluster:
        ranges = {}
        for first, last, primary, *_ in await _ask(host, port, b"CLUSTER", b"SLOTS"):
            address = (primary[0].decode() or host, int(primary[1]))
            ranges.setdefault(address, []).append((int(first), int(last)))
    channels = [SessionKeys(f"{prefix}{n}").live.encode() for n in range(sessions)]
    found = []
    for (node_host, node_port), spans in ranges.items():

        def owned(channel: bytes, spans: list[tuple[int, int]] = spans) -> bool:
            return any(first <= key_slot(channel) <= last for first, last in spans)

        probe = next(c for k in range(100_000) if owned(c := b"tf:{probe-%d}:live" % k))
        found.append(Node(node_host, node_port, [c for c in channels if owned(c)], probe))
    return found


async def probe(node: Node, interval: float, counter: list[int]) -> None:
    reader, writer = await asyncio.open_connection(node.host, node.port)
    parser = hiredis.Reader()
    try:
        while True:
            await asyncio.sleep(interval)
            writer.write(_command(b"SPUBLISH", node.probe, b"%d" % time.time_ns()))
            counter[0] += 1
            while parser.gets() is False:
                parser.feed(await reader.read(4096))
    finally:
        writer.close()


def _same(recorder: Recorder) -> Recorder:
    return recorder


async def run(args: argparse.Namespace) -> tuple[Tally, int, list[Node]]:
    """Record until SIGTERM; returns what was recorded, how many probes were published, and the nodes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tally, probes_sent = Tally(), [0]
    subscribed = await nodes(args.redis_url, args.cluster, args.sessions_prefix, args.sessions)
    recorders = [Recorder(tally, node) for node in subscribed]
    for recorder in recorders:
        await loop.create_connection(
            functools.partial(_same, recorder), recorder.node.host, recorder.node.port
        )
    await asyncio.wait_for(asyncio.gather(*(recorder.subscribed.wait() for recorder in recorders)), 30)
    probers = [asyncio.create_task(probe(node, args.probe_ms / 1000, probes_sent)) for node in subscribed]
    write_ready_file(args.ready_file, args.redis_url, role="live_reader")
    await stop.wait()
    for prober in probers:
        prober.cancel()
    return tally, probes_sent[0], subscribed


def save(tally: Tally, probes_sent: int, subscribed: list[Node], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tokens.bin").open("wb") as file:
        tally.tokens.tofile(file)
    with (out / "probes.bin").open("wb") as file:
        tally.probes.tofile(file)
    (out / "events.json").write_text(json.dumps(tally.lifecycle))
    summary: dict[str, Any] = {
        "messages": tally.messages,
        "delta_messages": tally.deltas,
        "tokens": len(tally.tokens) // 2,
        "other_types": tally.other_types,
        "probes_sent": probes_sent,
        "probes_received": len(tally.probes) // 2,
        "socket_reads": tally.reads,
        "parse_seconds": tally.busy_ns / 1e9,
        "channels_per_node": {f"{node.host}:{node.port}": len(node.channels) for node in subscribed},
    }
    (out / "summary.json").write_text(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--cluster", action="store_true", help="--redis-url is a node of a Redis Cluster")
    parser.add_argument("--sessions-prefix", required=True, help="the sessions are PREFIX0 .. PREFIX<N-1>")
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--probe-ms", type=float, default=10.0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        tally, probes_sent, subscribed = runner.run(run(args))
    save(tally, probes_sent, subscribed, Path(args.out))


if __name__ == "__main__":
    main()
