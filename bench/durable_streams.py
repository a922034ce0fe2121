"""1,000 readers of one session: Durable Streams catch-up and long-poll reads beside the relay's WebSocket, in one run.

    ./dev bench durable_streams [--readers 1000] [--rate 5] [--seconds 10] [--history 200] [--runs 1]

One stack (embedded Valkey, `tokenfan api`, `tokenfan relay`), one session. A producer appends app events (the
store's own call behind ``POST /ds/sessions/S``, made from this process so that a busy API cannot slow the
offered load; each event carries its append time) at `--rate` per second; the three ways of reading it run one
after another, each with `--readers` readers for `--seconds`:

* **relay**: WebSocket subscribers of the session (``/v1/sessions/S/stream``), live;
* **long-poll**: ``GET /ds/sessions/S?offset=<last>&live=long-poll``, each reader asking again at once with the
  offset it was given;
* **catch-up**: ``GET /ds/sessions/S?offset=<X>`` in a loop, X being `--history` events back from the tail,
  while nothing is appended: the read a client resuming from X makes (and a CDN would collapse).

Reported per mode: reads per second (HTTP responses; WebSocket frames for the relay), events delivered per
second, latency p50/p99 (live modes: from the event's send to its receipt; catch-up: request to response), and
the serving process's CPU per read. Clients are lean (raw HTTP/1.1 keep-alive over asyncio streams; the
`websockets` client for the relay), in this one process, on the same 2 cores as the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect

from api.http.ds.sessions import app_event_bodies
from bench.harness import Stack, cpu_delta, log, percentile, running, save, wait_until_quiet
from tokenfan.store import Store, redis_client

SESSION = "bench-ds"


@dataclass
class Tally:
    """What the readers of one mode saw."""

    reads: int = 0
    events: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def report(self, seconds: float, cpu: float, readers: int) -> dict[str, Any]:
        return {
            "readers": readers,
            "reads_per_s": round(self.reads / seconds),
            "events_per_s": round(self.events / seconds),
            "p50_ms": round(percentile(self.latencies_ms, 50), 1),
            "p99_ms": round(percentile(self.latencies_ms, 99), 1),
            "server_cpu_s": round(cpu, 2),
            "server_cpu_us_per_read": round(cpu / max(1, self.reads) * 1e6, 1),
        }


class Http:
    """One keep-alive HTTP/1.1 connection: the cheapest client there is, so the servers are what is measured."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0][9:12]), headers, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _received(tally: Tally, events: list[dict[str, Any]], now_ns: int) -> None:
    for event in events:
        if event.get("type") == "x.bench":
            tally.events += 1
            tally.latencies_ms.append((now_ns - int(event["t"])) / 1e6)


async def produce(stack: Stack, rate: float, until: float) -> int:
    assert stack.redis is not None
    store, sent = Store(redis_client(stack.redis.url), session_ttl_seconds=3600, stream_max_length=100_000), 0
    try:
        while time.monotonic() < until:
            event = json.dumps({"type": "x.bench", "t": time.time_ns()}).encode()
            await store.append_app_events(SESSION, app_event_bodies(SESSION, event), None)
            sent += 1
            await asyncio.sleep(1 / rate)  # the producer's pace: the load, not a synchronisation
    finally:
        await store.close()
    return sent


async def long_poll_reader(api: str, tally: Tally, offset: str, until: float) -> None:
    http = Http(api)
    try:
        while time.monotonic() < until:
            status, headers, body = await http.request(
                "GET", f"/ds/sessions/{SESSION}?offset={offset}&live=long-poll"
            )
            tally.reads += 1
            if status == 200:
                _received(tally, json.loads(body), time.time_ns())
            offset = headers["stream-next-offset"]
    finally:
        http.close()


async def relay_reader(relay: str, after: str, tally: Tally, ready: asyncio.Event, until: float) -> None:
    async with connect(f"{relay}/v1/sessions/{SESSION}/stream?after={after}", max_size=None) as socket:
        ready.set()
        while (left := until - time.monotonic()) > 0:
            try:
                frame = await asyncio.wait_for(socket.recv(), left)
            except TimeoutError:
                return
            tally.reads += 1
            _received(tally, [json.loads(frame)], time.time_ns())


async def catch_up_reader(api: str, tally: Tally, offset: str, until: float) -> None:
    http = Http(api)
    try:
        while time.monotonic() < until:
            started = time.perf_counter()
            status, _, body = await http.request("GET", f"/ds/sessions/{SESSION}?offset={offset}")
            assert status == 200, status
            tally.reads += 1
            tally.events += body.count(b'{"offset":')  # counted, not parsed: the client must stay cheap
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
    finally:
        http.close()


async def last_offsets(api: str, back: int) -> tuple[str, str]:
    """The offset of the event `back` before the session's newest: as the relay writes it, and as
    Durable Streams does (``<ms>_<seq>_<epoch>``)."""
    http, events, offset = Http(api), [], "-1"
    try:
        while True:  # every page of the history
            _, headers, body = await http.request("GET", f"/ds/sessions/{SESSION}?offset={offset}")
            events += json.loads(body)
            offset = headers["stream-next-offset"]
            if "stream-up-to-date" in headers:
                break
    finally:
        http.close()
    relay = events[-back - 1]["offset"]
    epoch, _, entry = relay.partition(":")
    ms, _, seq = entry.partition("-")
    return relay, f"{int(ms):016d}_{int(seq):016d}_{epoch}"


Mode = Callable[[Stack, argparse.Namespace, Tally, float], Awaitable[None]]


async def run_relay(stack: Stack, args: argparse.Namespace, tally: Tally, until: float) -> None:
    ready = [asyncio.Event() for _ in range(args.readers)]
    after, _ = await last_offsets(stack.url("api"), 0)
    readers = [
        asyncio.create_task(relay_reader(stack.url("relay"), after, tally, event, until + 2))
        for event in ready
    ]
    await asyncio.gather(*(event.wait() for event in ready))
    await produce(stack, args.rate, until)
    await asyncio.gather(*readers)


async def run_long_poll(stack: Stack, args: argparse.Namespace, tally: Tally, until: float) -> None:
    _, offset = await last_offsets(stack.url("api"), 0)
    readers = [
        asyncio.create_task(long_poll_reader(stack.url("api"), tally, offset, until))
        for _ in range(args.readers)
    ]
    await produce(stack, args.rate, until)
    for reader in readers:  # each is waiting in a long-poll that nothing will answer before its timeout
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


async def run_catch_up(stack: Stack, args: argparse.Namespace, tally: Tally, until: float) -> None:
    _, offset = await last_offsets(stack.url("api"), args.history)
    await asyncio.gather(
        *(catch_up_reader(stack.url("api"), tally, offset, until) for _ in range(args.readers))
    )


MODES: dict[str, tuple[Mode, str]] = {
    "relay (WebSocket)": (run_relay, "relay"),
    "long-poll": (run_long_poll, "api"),
    "catch-up": (run_catch_up, "api"),
}


async def measure(stack: Stack, args: argparse.Namespace, name: str) -> dict[str, Any]:
    mode, server = MODES[name]
    await wait_until_quiet(10)
    tally = Tally()
    before = stack.cpu()
    started = time.monotonic()
    await mode(stack, args, tally, started + args.seconds)
    elapsed = args.seconds
    cpu = cpu_delta(before, stack.cpu())
    result = tally.report(elapsed, cpu[server], args.readers)
    log(f"{name}: {result}")
    return {"mode": name, **result}


async def main(args: argparse.Namespace) -> None:
    with running(Stack(workers=0, env_overrides=_ENV)) as stack:
        http = Http(stack.url("api"))
        for _ in range(max(args.history + 1, 10)):  # the history catch-up reads
            body = json.dumps({"type": "x.bench", "t": time.time_ns()}).encode()
            await http.request("POST", f"/ds/sessions/{SESSION}", body)
        http.close()
        results = [await measure(stack, args, name) for _ in range(args.runs) for name in MODES]
    path = save("durable_streams", {"args": vars(args), "results": results})
    log(f"saved {path}")


_ENV = {
    "TOKENFAN_DS_APPENDS_PER_MINUTE": "0",
    "TOKENFAN_RELAY_MAX_CONNECTIONS_PER_ADDRESS": "100000",
    "TOKENFAN_SSE_MAX_STREAMS_PER_ADDRESS": "100000",
}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5.0, help="events appended per second (live modes)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--history", type=int, default=200, help="how far back catch-up reads start")
    parser.add_argument("--runs", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
