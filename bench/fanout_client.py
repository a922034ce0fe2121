"""A lean WebSocket subscriber for the fan-out benchmark: many connections per process, little CPU per frame.

The `websockets` client spends about 14 µs per frame (one process saturates near 70k frames/s), which would
make the load generator, not the relay, the thing measured. This client speaks just enough RFC 6455 for a
subscriber: the opening handshake, unmasked server frames, pong and close replies. Per frame it reads the
header, finds ``"content":"`` and parses the leading timestamp, nothing else.

The benchmark's producer writes each delta's content as ``<send time, ns, 19 digits> `` padded to
`TOKEN_CHARS` characters, so a merged frame's content is a run of such pieces: its length says how many tokens
(deltas) the frame carries, and its first piece is the oldest token's append time. A frame's latency is
receipt time minus that time: the worst token of the frame.

One process is driven over a `multiprocessing` pipe by `bench.fanout`:

    ("connect", config)                  open config.paths (fresh counters); answers how many opened
    ("window", start_ns, end_ns)         count frames received in [start, end) (wall clock, ns)
    ("report",)                          answer with the counters and latency histogram
    ("disconnect",)                      close every connection
    ("catchup", config, tokens, secs, hold)
                                         open config.paths at once; answer each one's milestones until it
                                         holds `tokens` tokens (0: until it is live); then count `hold` s more
    ("exit",)                            close everything and exit

Every process also exits by itself after ``max_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

__all__ = ["TOKEN_CHARS", "ClientConfig", "LatencyHistogram", "run_client", "token_content"]

#: Characters of one token's content: a 19-digit ns timestamp, a space, padding.
TOKEN_CHARS = 24
_PAD = "x" * (TOKEN_CHARS - 20)
#: Latency histogram resolution (µs per bucket) and range.
BUCKET_US = 50
MAX_BUCKET = 400_000  # 20 s
#: A subscriber is at the live edge once a frame's newest token is younger than this on receipt.
LIVE_EDGE_NS = 100_000_000
_CONTENT = b'"content":"'
_SNAPSHOT = b'"type":"snapshot"'
_HANDSHAKE_END = b"\r\n\r\n"
_PONG = 0x8A
_CLOSE = 0x88


def token_content(now_ns: int) -> str:
    """The content of one benchmark token sent at `now_ns`."""
    return f"{now_ns:019d} {_PAD}"


@dataclass
class LatencyHistogram:
    """Counts of latencies in `BUCKET_US` buckets; mergeable across processes."""

    counts: dict[int, int] = field(default_factory=dict)

    def merge(self, other: dict[int, int]) -> None:
        for bucket, count in other.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile_ms(self, q: float) -> float:
        total = self.total
        if not total:
            return float("nan")
        rank = max(1, round(q / 100 * total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return (bucket + 0.5) * BUCKET_US / 1000
        return MAX_BUCKET * BUCKET_US / 1000


@dataclass
class ClientConfig:
    host: str
    port: int
    paths: list[str]
    #: Second octet of this process's source addresses: 127.<n>.x.y, at most `per_address` connections on
    #: each, so a relay's per-address connection limit (256 by default) holds as it would for real clients.
    address_octet: int = 10
    per_address: int = 100
    #: Handshakes in flight per process. Keep the sum over processes under the server's accept backlog
    #: (asyncio's default: 100), or SYNs get dropped and connecting takes seconds of retransmissions.
    connect_concurrency: int = 30

    def source(self, index: int) -> str:
        group = index // self.per_address
        return f"127.{self.address_octet}.{group // 250}.{group % 250 + 1}"


class Counters:
    """What every connection of this process adds to; one instance per process."""

    def __init__(self) -> None:
        self.window = (0, 0)
        self.frames = 0
        self.tokens = 0
        self.bytes = 0
        self.snapshots = 0
        self.other_frames = 0
        self.hist = [0] * (MAX_BUCKET + 1)
        # Per second of the window: frames, summed latency (µs), largest latency (µs).
        self.series: dict[int, list[int]] = {}
        self.total_frames = 0
        self.total_tokens = 0
        self.closes: dict[int, int] = {}
        self.errors: dict[str, int] = {}  # why connection attempts failed

    def report(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "snapshots": self.snapshots,
            "other_frames": self.other_frames,
            "hist": {bucket: count for bucket, count in enumerate(self.hist) if count},
            "series": self.series,
            "total_frames": self.total_frames,
            "total_tokens": self.total_tokens,
            "closes": self.closes,
            "errors": self.errors,
        }


class Subscriber(asyncio.Protocol):
    """One WebSocket subscription; counts what it receives into the process's `Counters`."""

    def __init__(
        self,
        counters: Counters,
        request: bytes,
        expect_tokens: int = 0,
        *,
        attempted_ns: int = 0,
        until_live: bool = False,
    ) -> None:
        self.counters = counters
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.open: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.buffer = b""
        self.tokens = 0
        self.expect_tokens = expect_tokens
        self.done_ns = 0
        # When this subscriber first tried to connect, connected (TCP), was upgraded (101), got its first
        # data frame, and (`until_live`) reached the live edge.
        self.started_ns = attempted_ns or time.time_ns()
        self.connected_ns = self.upgraded_ns = self.first_ns = self.live_ns = 0
        self.until_live = until_live
        self.finished: asyncio.Future[None] | None = None
        if expect_tokens or until_live:
            self.finished = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self.connected_ns = time.time_ns()
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_result(False)
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            data = self._handshake(data)
            if not data:
                return
        buf = self.buffer + data if self.buffer else data
        used = self._frames(buf, time.time_ns())
        self.buffer = buf[used:] if used < len(buf) else b""

    def _frames(self, buf: bytes, now: int) -> int:
        """Handle every complete frame in `buf` (all received at `now`); returns the bytes used."""
        i, n = 0, len(buf)
        while n - i >= 2:
            length, head = buf[i + 1] & 0x7F, 2  # a server's frames are not masked
            if length >= 126:
                head = 4 if length == 126 else 10
                if n - i < head:
                    break
                length = int.from_bytes(buf[i + 2 : i + head], "big")
            end = i + head + length
            if end > n:
                break
            opcode = buf[i] & 0x0F
            if opcode == 1:
                self._text(buf, i + head, end, now)
            elif not self._control(opcode, buf[i + head : end]):
                return n
            i = end
        return i

    def _control(self, opcode: int, payload: bytes) -> bool:
        """Answer a ping or a close; returns whether the connection goes on."""
        if opcode == 9:
            self._reply(_PONG, payload)
        elif opcode == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.counters.closes[code] = self.counters.closes.get(code, 0) + 1
            self._reply(_CLOSE, payload[:2])
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    def _handshake(self, data: bytes) -> bytes:
        self.buffer += data
        end = self.buffer.find(_HANDSHAKE_END)
        if end < 0:
            return b""
        ok = self.buffer.startswith(b"HTTP/1.1 101")
        rest, self.buffer = self.buffer[end + 4 :], b""
        self.upgraded = True
        self.upgraded_ns = time.time_ns()
        self.open.set_result(ok)
        if not ok and self.transport is not None:
            self.transport.close()
            return b""
        return rest

    def _text(self, buf: bytes, start: int, end: int, now: int) -> None:
        counters = self.counters
        at = buf.find(_CONTENT, start, end)
        if at < 0:
            if buf.find(_SNAPSHOT, start, end) >= 0:
                counters.snapshots += 1
            else:
                counters.other_frames += 1
            return
        at += 11
        closing = buf.find(b'"', at, end)
        tokens = (closing - at) // TOKEN_CHARS
        counters.total_frames += 1
        counters.total_tokens += tokens
        if not self.first_ns:
            self.first_ns = now
        self.tokens += tokens
        if self.finished is not None and not self.finished.done():
            self._progress(buf, at, closing, now)
        window_start, window_end = counters.window
        if window_start <= now < window_end:
            latency_us = (now - int(buf[at : at + 19])) // 1000
            counters.frames += 1
            counters.tokens += tokens
            counters.bytes += end - start
            bucket = latency_us // BUCKET_US
            counters.hist[bucket if 0 <= bucket < MAX_BUCKET else MAX_BUCKET] += 1
            second = (now - window_start) // 1_000_000_000
            row = counters.series.get(second)
            if row is None:
                counters.series[second] = [1, latency_us, latency_us]
            else:
                row[0] += 1
                row[1] += latency_us
                if latency_us > row[2]:
                    row[2] = latency_us

    def _progress(self, buf: bytes, at: int, closing: int, now: int) -> None:
        """Resolve `finished` once the expected tokens arrived, or (`until_live`) once the newest token of a
        frame (its content's last piece) is younger than `LIVE_EDGE_NS`: the subscriber is at the live edge."""
        if self.until_live:
            newest = int(buf[closing - TOKEN_CHARS : closing - 5]) if closing - at >= TOKEN_CHARS else 0
            if now - newest < LIVE_EDGE_NS:
                self.live_ns = self.done_ns = now
                assert self.finished is not None
                self.finished.set_result(None)
        elif self.tokens >= self.expect_tokens:
            self.done_ns = now
            assert self.finished is not None
            self.finished.set_result(None)

    def _reply(self, opcode: int, payload: bytes) -> None:
        # Client frames are masked; an all-zero mask key leaves the payload as is.
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes((opcode, 0x80 | len(payload), 0, 0, 0, 0)) + payload)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._reply(_CLOSE, (1000).to_bytes(2, "big"))
            self.transport.close()


def _request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _open(
    config: ClientConfig,
    paths: list[str],
    counters: Counters,
    expect_tokens: int = 0,
    *,
    until_live: bool = False,
) -> tuple[list[Subscriber], int]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(config.connect_concurrency)
    subscribers: list[Subscriber] = []
    failed = 0

    async def one(index: int, path: str) -> None:
        nonlocal failed
        async with gate:
            request = _request(config.host, config.port, path)
            attempted = time.time_ns()  # a subscriber's times run from its first attempt, retries included
            for _attempt in range(3):  # a SYN dropped by a full accept queue is retried after 1, 3, 7 s…
                try:
                    _, protocol = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: Subscriber(
                                counters,
                                request,
                                expect_tokens,
                                attempted_ns=attempted,
                                until_live=until_live,
                            ),
                            config.host,
                            config.port,
                            local_addr=(config.source(index), 0),
                        ),
                        10,
                    )
                    ok = await asyncio.wait_for(protocol.open, 20)
                except (OSError, TimeoutError) as exc:
                    reason = type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) else "")
                    counters.errors[reason] = counters.errors.get(reason, 0) + 1
                    continue
                if ok:
                    subscribers.append(protocol)
                    return
                counters.errors["refused"] = counters.errors.get("refused", 0) + 1
            failed += 1

    await asyncio.gather(*(one(index, path) for index, path in enumerate(paths)))
    return subscribers, failed


async def _catch_up(
    config: ClientConfig,
    paths: list[str],
    tokens: int,
    seconds: float,
    counters: Counters,
    *,
    hold: float = 0.0,
) -> dict[str, Any]:
    """Open `paths` at once; wait until each has `tokens` tokens (0: until each is live, see `Subscriber`),
    then, with `hold`, count what arrives over `hold` more seconds (the live tail after the storm)."""
    started = time.time_ns()
    subscribers, failed = await _open(config, paths, counters, expect_tokens=tokens, until_live=not tokens)
    pending = [s.finished for s in subscribers if s.finished is not None]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*pending), seconds)
    if hold:
        now = time.time_ns()
        counters.window = (now, now + int(hold * 1e9))
        await asyncio.sleep(hold)
    done = [(s.done_ns - started) / 1e6 for s in subscribers if s.done_ns]
    # Each finished subscriber's milestones, ms after this process began: its first connection attempt,
    # TCP connected, upgraded (101), first data frame, done (all tokens, or live).
    phases = [
        [(at - started) / 1e6 for at in (s.started_ns, s.connected_ns, s.upgraded_ns, s.first_ns, s.done_ns)]
        for s in subscribers
        if s.done_ns
    ]
    _close(subscribers)
    return {
        "started_ns": started,
        "done_ms": done,
        "phases_ms": phases,
        "failed": failed,
        "incomplete": len(paths) - len(done),
        "window": counters.report() if hold else None,
    }


def _receive(
    pipe: Connection, loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[tuple[Any, ...]]
) -> None:
    """Blocking receive in a daemon thread: a loop reader would make the pipe non-blocking, and a command
    larger than the socket buffer (thousands of paths) would then arrive torn."""
    while True:
        try:
            command = pipe.recv()
        except (EOFError, OSError):
            command = ("exit",)
        loop.call_soon_threadsafe(commands.put_nowait, command)
        if command[0] == "exit":
            return


async def _serve(pipe: Connection) -> None:
    counters = Counters()
    subscribers: list[Subscriber] = []
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_receive, args=(pipe, loop, commands), daemon=True).start()
    try:
        while True:
            command = await commands.get()
            kind = command[0]
            if kind == "connect":
                counters = Counters()
                subscribers, failed = await _open(command[1], command[1].paths, counters)
                pipe.send(("connected", len(subscribers), failed, counters.errors))
            elif kind == "window":
                counters.window = (command[1], command[2])
            elif kind == "report":
                pipe.send(("report", counters.report()))
            elif kind == "disconnect":
                _close(subscribers)
                subscribers = []
                pipe.send(("disconnected",))
            elif kind == "catchup":
                _, config, tokens, seconds, hold = command
                report = await _catch_up(config, config.paths, tokens, seconds, Counters(), hold=hold)
                pipe.send(("catchup", report))
            else:
                break
    finally:
        _close(subscribers)
        await asyncio.sleep(0.05)


def _close(subscribers: list[Subscriber]) -> None:
    for subscriber in subscribers:
        subscriber.close()


def run_client(pipe: Connection, max_seconds: float) -> None:
    """Process entry point (`multiprocessing`, spawn); exits by itself after `max_seconds`."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner, contextlib.suppress(TimeoutError, KeyboardInterrupt):
        runner.run(asyncio.wait_for(_serve(pipe), max_seconds))
    pipe.close()
    os._exit(0)
