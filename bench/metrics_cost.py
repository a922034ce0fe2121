"""What the instruments add to the hot paths, measured in one process, metrics off and on side by side.

    ./dev bench metrics_cost [--tokens 200000] [--passes 7]

CPU time (``time.process_time``) of the very code each hot path runs, fastest of ``--passes`` passes, with
the instruments of a process without a metrics port (off) and with one (on), alternating:

* the worker, per token: `GenerationStream.add_content` (what the job calls for every upstream piece: the
  stream's own bookkeeping, the coalescer, waking the writer, and with metrics on the token clock);
* the relay, per live batch: what `LiveMetrics.fanned_out` adds once the feed wrote a batch to its
  subscribers (frames and bytes counted, the lag of each entry observed), for a batch of one entry;
* a scrape: building the worker's exposition (prometheus-client), which a scrape every 15 s costs.

bench/worker.py and bench/fanout.py (part ``metrics``) measure the same on whole processes under load;
this one isolates the instruments from the noise of a shared machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from api.live.frames import FrameBatch
from api.live.metrics import LiveMetrics
from bench.harness import log, save
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId
from tokenfan.runtime.metrics import Metrics
from tokenfan.store import Store, redis_client
from worker.metrics import WorkerMetrics
from worker.stream_writer import StreamWriter


def fastest(passes: int, run: Callable[[], int]) -> float:
    """CPU seconds per operation of `run` (which returns how many it did), fastest of `passes`."""
    best = float("inf")
    for _ in range(passes):
        started = time.process_time()
        count = run()
        best = min(best, (time.process_time() - started) / count)
    return best


def worker_tokens(enabled: bool, tokens: int) -> Callable[[], int]:
    store = Store(redis_client("redis://127.0.0.1:1/0"), session_ttl_seconds=60, stream_max_length=10)
    writer = StreamWriter(store, metrics=WorkerMetrics(Metrics("worker", enabled=enabled)))

    def run() -> int:
        stream = writer.open("bench-session", "gen_01BENCH", 1, 0)
        add = stream.add_content
        for _ in range(tokens):
            add(" token")
        writer.close_stream(stream)
        stream.lane.dirty.clear()  # nothing flushes here: the writer's task does not run
        return tokens

    return run


def relay_batches(enabled: bool, batches: int) -> Callable[[], int]:
    metrics = LiveMetrics(Metrics("relay", enabled=enabled))
    body = b'{"type":"delta","session_id":"s","generation_id":"g","seq":1,"content":" token"}'
    now_ms = int(time.time() * 1000)

    def run() -> int:
        for n in range(batches):
            batch = FrameBatch([StreamEntry(StreamId(now_ms, n), b"epoch", body)])
            batch.frames  # noqa: B018 - made by the subscribers' writes before the metrics see the batch
            metrics.fanned_out(batch, 1000)
        return batches

    return run


def scrape_cost() -> float:
    metrics = Metrics("worker", enabled=True)
    WorkerMetrics(metrics)
    return fastest(7, lambda: len([metrics.exposition() for _ in range(50)]))


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--passes", type=int, default=7)
    args = parser.parse_args()
    result: dict[str, Any] = {"command": "./dev bench metrics_cost " + " ".join(sys.argv[1:])}
    for name, make, count in (
        ("worker_per_token", worker_tokens, args.tokens),
        ("relay_per_batch", relay_batches, args.tokens // 4),
    ):
        off, on = make(False, count), make(True, count)
        timings = {"off": float("inf"), "on": float("inf")}
        for _ in range(args.passes):  # alternate, so drift in the machine hits both
            timings["off"] = min(timings["off"], fastest(1, off))
            timings["on"] = min(timings["on"], fastest(1, on))
        us = {key: round(value * 1e6, 3) for key, value in timings.items()}
        result[name] = {"off_us": us["off"], "on_us": us["on"], "added_us": round(us["on"] - us["off"], 3)}
        log(f"{name}: off {us['off']} µs, on {us['on']} µs, added {result[name]['added_us']} µs")
    result["scrape_of_a_worker_ms"] = round(scrape_cost() * 1e3, 3)
    log(f"one scrape of a worker's metrics: {result['scrape_of_a_worker_ms']} ms of CPU")
    print(json.dumps(result, indent=2))
    print("saved", save("metrics_cost", result))


if __name__ == "__main__":
    asyncio.run(main())
