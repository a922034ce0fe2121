"""A lean OpenAI-compatible streaming upstream for the worker benchmark: many paced streams, little CPU.

    python -m bench.fast_upstream [--port 0] [--rate 50] [--tokens 1500] [--tick-ms 1] [--ready-file F]

The built-in simulator (Starlette) costs about 60 CPU-µs per token, which would take the CPU the worker being
measured needs. This server speaks just enough HTTP/1.1 (keep-alive, chunked transfer encoding) and the
``chat.completions`` streaming wire format to be read by the official ``openai`` client:

* ``POST …/chat/completions`` with ``"stream": true`` answers ``text/event-stream``: a role chunk at once,
  then one ``chat.completion.chunk`` per token, paced at ``rate`` tokens/s per stream, then a chunk with
  ``finish_reason: "stop"``, a usage chunk when ``stream_options.include_usage`` is set, and
  ``data: [DONE]``.
* Each token's content is ``" <time_ns>"``: the wall-clock time (``time.time_ns()``) at which it was written to
  the socket, so a reader downstream measures latency from the upstream's send.
* A request may override the defaults with ``<<fast {"tokens": N, "rate": R}>>`` in its last message.
* ``GET /stats`` answers counters as JSON (streams open, started, completed, tokens sent, ticker lateness);
  ``POST /stats/reset`` clears the lateness samples.

Pacing costs one timer: a ticker wakes every ``tick-ms`` and writes to every stream whose next token is due
(a heap ordered by due time). Each stream starts at a random phase within one token interval, so the
tokens of many streams are spread over time instead of arriving together.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import heapq
import json
import random
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, cast

from tokenfan.runtime.serving import write_ready_file

_DIRECTIVE = re.compile(r"<<fast (\{.*?\})>>")
_HEAD_END = b"\r\n\r\n"
_SSE_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"


def _chunked(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (chunked transfer encoding) carrying `payload`."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n\r\n%b" % (
        status.encode(),
        content_type,
        len(body),
        body,
    )


@dataclass
class Config:
    rate: float = 50.0
    tokens: int = 1500
    tick: float = 0.001


@dataclass
class Stats:
    streams_open: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_aborted: int = 0
    tokens_sent: int = 0
    lateness_ms: list[float] = field(default_factory=list)  # how late each tick ran (sampled)

    def as_json(self) -> dict[str, Any]:
        late = sorted(self.lateness_ms)

        def pick(q: float) -> float:
            return round(late[min(len(late) - 1, int(q / 100 * len(late)))], 3) if late else 0.0

        return {
            "streams_open": self.streams_open,
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "streams_aborted": self.streams_aborted,
            "tokens_sent": self.tokens_sent,
            "tick_lateness_ms_p50": pick(50),
            "tick_lateness_ms_p99": pick(99),
            "tick_lateness_ms_max": late[-1] if late else 0.0,
        }


class Stream:
    """One streamed completion being paced; its chunks are pre-built byte templates."""

    __slots__ = ("done", "envelope", "interval", "left", "prefix", "protocol", "suffix", "total", "usage")

    def __init__(self, protocol: Upstream, completion_id: str, model: str, tokens: int, rate: float) -> None:
        self.protocol = protocol
        self.left = tokens
        self.total = tokens
        self.interval = 1.0 / rate
        self.usage = False
        self.done = False
        # Everything of a chunk before its choices: `data: {"id":…,"object":…,"created":…,"model":…,"choices":`
        self.envelope = (
            b'data: {"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,"choices":'
            % (
                completion_id.encode(),
                int(time.time()),
                json.dumps(model).encode(),
            )
        )
        self.prefix = self.envelope + b'[{"index":0,"delta":{"content":" '
        self.suffix = b'"},"finish_reason":null}]}\n\n'

    def head(self) -> bytes:
        """Response headers and the first chunk (the assistant role, empty content), sent at once."""
        role = b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        return _SSE_HEADERS + _chunked(self.envelope + role)

    def token(self) -> bytes:
        return _chunked(self.prefix + b"%d" % time.time_ns() + self.suffix)

    def tail(self) -> bytes:
        """The finish chunk, the usage chunk when asked for, [DONE], and the end of the chunked body."""
        out = _chunked(self.envelope + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
        if self.usage:
            usage = {"prompt_tokens": 10, "completion_tokens": self.total, "total_tokens": self.total + 10}
            out += _chunked(self.envelope + b'[],"usage":' + json.dumps(usage).encode() + b"}\n\n")
        return out + _chunked(b"data: [DONE]\n\n") + _LAST_CHUNK


class Pacer:
    """The ticker: writes every due token, then sleeps one tick."""

    def __init__(self, config: Config, stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self.heap: list[tuple[float, int, Stream]] = []
        self._counter = 0
        self._wake = asyncio.Event()

    def add(self, stream: Stream) -> None:
        due = asyncio.get_running_loop().time() + random.random() * stream.interval
        self._counter += 1
        heapq.heappush(self.heap, (due, self._counter, stream))
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        heap, stats, tick = self.heap, self.stats, self.config.tick
        clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution: too coarse to sample
        expected = clock()
        samples = 0
        while True:
            if not heap:
                self._wake.clear()
                await self._wake.wait()
                expected = clock()
            now = loop.time()
            samples += 1
            if samples % 16 == 0 and len(stats.lateness_ms) < 200_000:
                stats.lateness_ms.append(max(0.0, (clock() - expected) * 1000))
            sent = 0
            while heap and heap[0][0] <= now:
                due, order, stream = heapq.heappop(heap)
                if stream.done:
                    continue
                protocol = stream.protocol
                if stream.left > 0:
                    protocol.write(stream.token())
                    stream.left -= 1
                    sent += 1
                    heapq.heappush(heap, (due + stream.interval, order, stream))
                else:
                    protocol.write(stream.tail())
                    stream.done = True
                    protocol.end_stream(completed=True)
            stats.tokens_sent += sent
            expected = clock() + tick
            await asyncio.sleep(tick)


class Upstream(asyncio.Protocol):
    """One HTTP/1.1 connection; requests on it are served one after another (keep-alive)."""

    def __init__(self, config: Config, stats: Stats, pacer: Pacer) -> None:
        self.config = config
        self.stats = stats
        self.pacer = pacer
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None and not self.stream.done:
            self.stream.done = True
            self.stats.streams_aborted += 1
            self.stats.streams_open -= 1
        self.stream = None
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def end_stream(self, *, completed: bool) -> None:
        self.stream = None
        self.stats.streams_open -= 1
        if completed:
            self.stats.streams_completed += 1
        if self.buffer:
            self._parse()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.stream is None:
            self._parse()

    def _parse(self) -> None:
        end = self.buffer.find(_HEAD_END)
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        self._handle(method, target.split("?")[0], body)

    def _handle(self, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/stats":
            self.write(_response("200 OK", json.dumps(self.stats.as_json()).encode()))
        elif method == "POST" and path == "/stats/reset":
            self.stats.lateness_ms.clear()
            self.write(_response("200 OK", b"{}"))
        elif method == "POST" and path.endswith("/chat/completions"):
            self._start_stream(json.loads(body))
        else:
            error = {"error": {"message": f"no route {method} {path}", "type": "not_found"}}
            self.write(_response("404 Not Found", json.dumps(error).encode()))
        if self.stream is None and self.buffer:
            self._parse()

    def _start_stream(self, request: dict[str, Any]) -> None:
        tokens, rate = self.config.tokens, self.config.rate
        messages = request.get("messages") or [{}]
        match = _DIRECTIVE.search(str(messages[-1].get("content", "")))
        if match:
            directive = json.loads(match.group(1))
            tokens, rate = int(directive.get("tokens", tokens)), float(directive.get("rate", rate))
        if not request.get("stream"):
            error = {"error": {"message": "this upstream only streams", "type": "invalid_request_error"}}
            self.write(_response("400 Bad Request", json.dumps(error).encode()))
            return
        self.stats.streams_started += 1
        self.stats.streams_open += 1
        stream = Stream(
            self, f"chatcmpl-{self.stats.streams_started}", str(request.get("model", "")), tokens, rate
        )
        stream.usage = bool((request.get("stream_options") or {}).get("include_usage"))
        self.stream = stream
        self.write(stream.head())
        self.pacer.add(stream)


async def serve(config: Config, port: int, ready_file: str | None) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stats = Stats()
    pacer = Pacer(config, stats)
    server = await loop.create_server(lambda: Upstream(config, stats, pacer), "127.0.0.1", port, backlog=4096)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    write_ready_file(ready_file, url, role="fast_upstream")
    if ready_file is None:
        print(url, flush=True)
    ticker = asyncio.create_task(pacer.run())
    await stop.wait()
    ticker.cancel()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second per stream")
    parser.add_argument("--tokens", type=int, default=1500, help="tokens per stream")
    parser.add_argument("--tick-ms", type=float, default=1.0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    config = Config(rate=args.rate, tokens=args.tokens, tick=args.tick_ms / 1000)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config, args.port, args.ready_file))


if __name__ == "__main__":
    main()
