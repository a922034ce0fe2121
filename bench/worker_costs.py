"""What a worker spends per token and per generation per flush, in one process, timed alone.

    ./dev bench worker_costs [--tokens 100000] [--generations 250] [--passes 5]

No sockets and no Redis: the very code of the hot paths, with `time.process_time`, fastest of ``--passes``:

* **the read, per token**: one HTTP chunk of a realistic ``chat.completion.chunk`` (its text a bench
  timestamp, as `bench.fast_upstream` sends) handed to the connection's callback as one socket read
  (`_Connection.data_received`), through the transport's chunked decoding, the SSE decoding, JSON, the chunk
  reader and into a generation's stream (`GenerationStream.add_content`: its coalescer), with the metrics
  port off and on, and with two chunks in each read (a worker running behind);
* **the flush, per generation**: for ``--generations`` streams holding one token each (a model's pace at a
  short flush window), what the writer does per item: take and encode its events (`FlushLane.collect`),
  lay out and pack the script call as the bytes sent (`write_layout.packed_write`), and read back and apply
  each item's result;
* **a token's metrics**: `TokenPace.tick` alone.

These are the numbers to compare between two versions of the worker on the same machine: unlike the system
benchmark (bench/worker.py) they do not depend on what else the machine does, nor on how many tokens an event
carries.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: this checkout first (bench/worker.py would shadow `worker`)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from bench.harness import save
from tokenfan.runtime.metrics import Metrics
from tokenfan.store import Store, redis_client
from tokenfan.store.write_layout import WriteCall, packed_write
from tokenfan.store.writes import _write_result
from worker.generate import _Received
from worker.metrics import WorkerMetrics
from worker.retained import SentEvents, TextParts
from worker.stream_writer import StreamWriter
from worker.transport import _CHUNKED, Body, _Connection
from worker.upstream import _reading

ENVELOPE = (
    b'data: {"id":"chatcmpl-0123456789","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-upstream","choices":'
)


def http_chunks(count: int) -> list[bytes]:
    """What a socket read carries at a model's pace: one HTTP chunk, one event, one token."""
    chunks = []
    for n in range(count):
        event = ENVELOPE + b'[{"index":0,"delta":{"content":" %d"},"finish_reason":null}]}\n\n' % (
            1_712_345_678_901_234_567 + n
        )
        chunks.append(b"%x\r\n%b\r\n" % (len(event), event))
    return chunks


def unconnected_store() -> Store:
    """A store for a writer that never flushes here (a single Redis that is never asked: one lane)."""
    return Store(redis_client("redis://127.0.0.1:1/0"), session_ttl_seconds=60, stream_max_length=10)


def fastest(passes: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(passes))


def read_cost(tokens: int, passes: int, metrics: bool, per_read: int = 1) -> float:
    """CPU-µs per token of the read, from the connection's callback (`per_read` chunks in each read) to the
    generation's coalescer."""
    writer = StreamWriter(unconnected_store(), metrics=WorkerMetrics(Metrics("worker", enabled=metrics)))
    stream = writer.open("bench-session", "gen_01BENCH0000000000000000000", 1, 0)
    loop = asyncio.new_event_loop()
    connection = _Connection(None, ("http", "upstream", 80), loop)  # type: ignore[arg-type]
    body = Body(connection, _CHUNKED, 0, 600.0)
    connection.body = body
    body.deliver(_reading(_Received(stream), None))
    chunks = http_chunks(1000)
    reads = [b"".join(chunks[n : n + per_read]) for n in range(0, 1000, per_read)]
    received = connection.data_received

    def run() -> float:
        started = time.process_time()
        for n in range(tokens // per_read):
            received(reads[n % len(reads)])
            if n % 250 == 0:  # what a flush takes away, so that nothing grows across passes
                stream.text_parts = TextParts()
                stream.coalescer.drain()
                stream.lane.dirty.clear()
        return time.process_time() - started

    try:
        return fastest(passes, run) / tokens * 1e6
    finally:
        loop.close()


def flush_costs(generations: int, passes: int) -> dict[str, float]:
    """CPU-µs per generation per flush, by step, with one token per generation."""
    writer = StreamWriter(unconnected_store())
    streams = [writer.open(f"bench-{n}", f"gen_{n:026d}", 1, 5) for n in range(generations)]
    row = b"abcd1234 1796404719348-0 12"  # write.lua's reply for a generation written and still running
    totals = {"take and encode": 0.0, "lay out and pack": 0.0, "results": 0.0}
    rounds = 200
    best: dict[str, float] = {}
    for _ in range(passes):
        totals = dict.fromkeys(totals, 0.0)
        for _ in range(rounds):
            for stream in streams:
                stream.add_content(" 1712345678901234567")
            started = time.process_time()
            batch = streams[0].lane.collect()
            laid = time.process_time()
            packed_write("0" * 40, [item for _, item in batch], WriteCall(1, 1000, 60, "ep", len(batch)))
            read = time.process_time()
            for (stream, item), result in zip(batch, [_write_result(row) for _ in batch], strict=True):
                stream._apply(item, result)
            done = time.process_time()
            for step, seconds in zip(totals, (laid - started, read - laid, done - read), strict=True):
                totals[step] += seconds
            for stream in streams:
                stream.text_parts = TextParts()
                stream._sent = SentEvents(stream.next_seq, stream._sent.plain_delta)
        for step, seconds in totals.items():
            best[step] = min(best.get(step, float("inf")), seconds / (rounds * generations) * 1e6)
    best["all"] = sum(best.values())
    return {step: round(value, 2) for step, value in best.items()}


def tick_cost(passes: int) -> float:
    pace = WorkerMetrics(Metrics("worker", enabled=True)).pace()
    pace.tick()
    count = 1_000_000

    def run() -> float:
        tick, started = pace.tick, time.process_time()
        for _ in range(count):
            tick()
        return time.process_time() - started

    return fastest(passes, run) / count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--generations", type=int, default=250)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "command": " ".join(["./dev bench worker_costs", *sys.argv[1:]]),
        "read_cpu_us_per_token": round(read_cost(args.tokens, args.passes, metrics=False), 2),
        "read_cpu_us_per_token_metrics_on": round(read_cost(args.tokens, args.passes, metrics=True), 2),
        "read_cpu_us_per_token_two_per_read": round(
            read_cost(args.tokens, args.passes, False, per_read=2), 2
        ),
        "flush_cpu_us_per_generation": flush_costs(args.generations, args.passes),
        "token_pace_tick_us": round(tick_cost(args.passes), 3),
    }
    print(json.dumps(result, indent=2))
    print("saved", save("worker_costs", result))


if __name__ == "__main__":
    asyncio.run(main())
