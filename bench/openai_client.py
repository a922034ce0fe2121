"""CPU per chunk of the official openai client: typed vs generic streaming; httpx2's, aiohttp's or the worker's
own transport (`worker.transport`); and the worker's whole read of a stream (`worker.upstream.Upstream`).

    ./dev bench openai_client [--tokens 5000] [--streams 20] [--runs 3]

This decided how the worker reads the upstream (worker/upstream.py). The simulator runs in its own process;
the figure is the CPU this process spends per chunk received (user + system, from os.times()).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: this checkout first (bench/worker.py would shadow `worker`)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import openai

from bench.harness import median, save
from tokenfan.cli.processes import ChildProcess
from tokenfan.runtime.settings import Settings
from worker.transport import StreamingTransport
from worker.upstream import Upstream


def cpu() -> float:
    times = os.times()
    return times.user + times.system


async def typed(client: openai.AsyncOpenAI, prompt: str) -> int:
    stream = await client.chat.completions.create(
        model="tokenfan-sim", messages=[{"role": "user", "content": prompt}], stream=True
    )
    return sum([1 async for _ in stream])


async def generic(client: openai.AsyncOpenAI, prompt: str) -> int:
    stream = await client.post(
        "/chat/completions",
        body={"model": "tokenfan-sim", "stream": True, "messages": [{"role": "user", "content": prompt}]},
        cast_to=object,
        stream=True,
        stream_cls=openai.AsyncStream[object],
    )
    return sum([1 async for _ in stream])


class _Count:
    """Counts what the worker's read hands over: one per content piece or update."""

    def __init__(self) -> None:
        self.count = 0

    def text(self, text: str) -> None:
        self.count += 1

    def updates(self, updates: list[Any]) -> None:
        self.count += len(updates)


def worker_read(upstream: Upstream) -> Callable[[openai.AsyncOpenAI, str], Awaitable[int]]:
    async def read(client: openai.AsyncOpenAI, prompt: str) -> int:
        counted = _Count()
        await upstream.stream(
            {"model": "tokenfan-sim", "messages": [{"role": "user", "content": prompt}]}, counted
        )
        return counted.count + 1  # the role chunk carries no update, but was read like the others

    return read


async def measure(
    read: Callable[[openai.AsyncOpenAI, str], Awaitable[int]],
    client: openai.AsyncOpenAI,
    streams: int,
    tokens: int,
) -> tuple[float, float]:
    prompt = "bench <<sim " + json.dumps({"tokens": tokens // streams}) + ">>"
    before, started = cpu(), time.perf_counter()
    chunks = sum(await asyncio.gather(*(read(client, f"{n} {prompt}") for n in range(streams))))
    return (cpu() - before) / chunks * 1e6, chunks / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=5000)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    simulator = ChildProcess("simulator", ["--port", "0", "--tokens-per-second", "0"]).start()
    base_url = simulator.wait_ready() + "/v1"
    rows: dict[str, Any] = {}
    try:
        for transport in ("httpx2", "aiohttp", "worker"):
            http_client: httpx2.AsyncClient | None = None
            if transport == "aiohttp":
                http_client = openai.DefaultAioHttpClient()
            elif transport == "worker":
                http_client = httpx2.AsyncClient(transport=StreamingTransport())
            client = openai.AsyncOpenAI(
                base_url=base_url, api_key="unset", max_retries=0, http_client=http_client
            )
            for name, read in (("typed chat.completions.create", typed), ("generic client.post", generic)):
                await read(client, 'warm up <<sim {"tokens": 10}>>')
                samples = [await measure(read, client, args.streams, args.tokens) for _ in range(args.runs)]
                rows[f"{name} / {transport}"] = {
                    "cpu_us_per_chunk": round(median([s[0] for s in samples]), 1),
                    "chunks_per_second": round(median([s[1] for s in samples])),
                }
            await client.close()
        settings = Settings.from_env({"OPENAI_BASE_URL": base_url, "REDIS_URL": "redis://unused"})
        for transport in ("aiohttp", "worker"):
            upstream = Upstream(settings, openai.DefaultAioHttpClient() if transport == "aiohttp" else None)
            reader = worker_read(upstream)
            await reader(upstream.client, 'warm up <<sim {"tokens": 10}>>')
            samples = [
                await measure(reader, upstream.client, args.streams, args.tokens) for _ in range(args.runs)
            ]
            rows[f"the worker's read (Upstream.stream) / {transport}"] = {
                "cpu_us_per_chunk": round(median([s[0] for s in samples]), 1),
                "chunks_per_second": round(median([s[1] for s in samples])),
            }
            await upstream.close()
    finally:
        simulator.stop()
    baseline = rows["typed chat.completions.create / httpx2"]["cpu_us_per_chunk"]
    for row in rows.values():
        row["cpu_vs_typed_httpx2"] = round(row["cpu_us_per_chunk"] / baseline, 3)
    command = f"./dev bench openai_client --tokens {args.tokens} --streams {args.streams} --runs {args.runs}"
    print(json.dumps(rows, indent=2))
    print("saved", save("openai_client", {"command": command, "rows": rows}))


if __name__ == "__main__":
    asyncio.run(main())
