"""The CPU per token the OpenAI-compatible front door adds over the native SSE endpoint, side by side in one run.

    ./dev bench front_door [--streams 50] [--tokens 200] [--rate 50] [--runs 5]

Three ways to get the same generations, each `--streams` concurrent requests of `--tokens` tokens from a
simulator pacing every stream at `--rate` tokens per second (a real model's pace: each token its own event):

* **native**: ``POST /v1/sessions/{id}/generations``, watched by ``GET /v1/sessions/{id}/events`` (SSE);
* **chat**: ``POST /v1/chat/completions`` with ``stream: true`` (chunks, ``stream_options.include_usage``);
* **responses**: ``POST /v1/responses`` with ``background: true, stream: true``.

Every run measures each mode once, in an order that rotates from run to run, so drift on the shared machine
lands on all three alike. Reported: the API process's CPU per token delivered (its only work that differs
between the modes; the worker's is shown to be the same), the front door's ratio to native and the CPU-µs per
token it adds, and time to first token. Clients read raw lines with httpx, the same cheap reader for every mode:
the load generator is not what is measured, and it shares the cores.

Beside it, in this process: the per-event path alone, which is what differs (native SSE splices the offset into
the stored body; the front door parses the body and folds it), timed over many events with ``process_time``.
That figure has no scheduling noise, so it shows the difference the system figures blur.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from api.http.openai.chunks import ChatStream
from api.http.openai.follow import FoldingSink
from api.http.openai.responses_events import ResponseEvents, ResponseSse
from api.http.sse import SseSink
from api.live.frames import FrameBatch
from bench.harness import Stack, cpu_delta, log, median, percentile, running, save, wait_until_quiet
from tokenfan.contract.events import EventType, StreamEntry, encode_body, event_body
from tokenfan.contract.offsets import StreamId

MODEL = "tokenfan-sim"
MODES = ("native", "chat", "responses")
Reader = Callable[[httpx.AsyncClient, str, str], Awaitable[float]]


def _content(text: str, tokens: int, rate: float) -> str:
    return f"{text} <<sim {json.dumps({'tokens': tokens, 'rate': rate})}>>"


async def native(client: httpx.AsyncClient, name: str, prompt: str) -> float:
    """Watch a session over SSE, ask for a generation in it; seconds to its first delta."""
    async with client.stream("GET", f"/v1/sessions/{name}/events") as events:
        posted = time.perf_counter()
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
        (await client.post(f"/v1/sessions/{name}/generations", json=body)).raise_for_status()
        first = 0.0
        async for line in events.aiter_lines():
            if line == "event: delta" and not first:
                first = time.perf_counter() - posted
            elif line == "event: generation.completed":
                return first
    raise RuntimeError("the SSE stream ended before its generation")


async def chat(client: httpx.AsyncClient, name: str, prompt: str) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    posted = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        answer.raise_for_status()
        first = 0.0
        async for line in answer.aiter_lines():
            if (
                not first
                and line.startswith("data: ")
                and '"content":"' in line
                and '"content":""' not in line
            ):
                first = time.perf_counter() - posted
            elif line == "data: [DONE]":
                return first
    raise RuntimeError("the chat stream ended before [DONE]")


async def responses(client: httpx.AsyncClient, name: str, prompt: str) -> float:
    body = {"model": MODEL, "input": prompt, "background": True, "stream": True}
    posted = time.perf_counter()
    async with client.stream("POST", "/v1/responses", json=body) as answer:
        answer.raise_for_status()
        first = 0.0
        async for line in answer.aiter_lines():
            if line == "event: response.output_text.delta" and not first:
                first = time.perf_counter() - posted
            elif line == "event: response.completed":
                return first
    raise RuntimeError("the response stream ended before response.completed")


READERS: dict[str, Reader] = {"native": native, "chat": chat, "responses": responses}


async def phase(stack: Stack, mode: str, run: int, streams: int, tokens: int, rate: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=2 * streams + 10, max_keepalive_connections=2 * streams + 10)
    async with httpx.AsyncClient(base_url=stack.url("api"), timeout=120, limits=limits) as client:
        before = stack.cpu()
        started = time.perf_counter()
        firsts = await asyncio.gather(
            *(
                READERS[mode](client, f"bench-{mode}-{run}-{n}", _content(f"{mode} {run} {n}", tokens, rate))
                for n in range(streams)
            )
        )
        elapsed = time.perf_counter() - started
        cpu = cpu_delta(before, stack.cpu())
    delivered = streams * tokens
    return {
        "mode": mode,
        "seconds": elapsed,
        "api_cpu_us_per_token": cpu["api"] / delivered * 1e6,
        "worker_cpu_us_per_token": cpu["worker-0"] / delivered * 1e6,
        "time_to_first_token_ms": [first * 1000 for first in firsts],
        "cpu_seconds": cpu,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        api = [run["api_cpu_us_per_token"] for run in mine]
        ttft = [value for run in mine for value in run["time_to_first_token_ms"]]
        by_mode[mode] = {
            "api_cpu_us_per_token_median": median(api),
            "api_cpu_us_per_token_min": min(api),
            "api_cpu_us_per_token_max": max(api),
            "worker_cpu_us_per_token_median": median([run["worker_cpu_us_per_token"] for run in mine]),
            "time_to_first_token_ms_p50": percentile(ttft, 50),
            "time_to_first_token_ms_p90": percentile(ttft, 90),
            "time_to_first_token_ms_p99": percentile(ttft, 99),
        }
    native_cpu = by_mode["native"]["api_cpu_us_per_token_median"]
    for mode in ("chat", "responses"):
        mine = by_mode[mode]["api_cpu_us_per_token_median"]
        by_mode[mode]["ratio_to_native"] = mine / native_cpu
        by_mode[mode]["added_api_cpu_us_per_token"] = mine - native_cpu
        # The same ratio run by run (each run measured every mode back to back), to show its spread.
        pairs = zip(
            [r for r in runs if r["mode"] == mode], [r for r in runs if r["mode"] == "native"], strict=True
        )
        ratios = [front["api_cpu_us_per_token"] / base["api_cpu_us_per_token"] for front, base in pairs]
        by_mode[mode]["ratio_per_run_p10"] = percentile(ratios, 10)
        by_mode[mode]["ratio_per_run_p50"] = percentile(ratios, 50)
        by_mode[mode]["ratio_per_run_p90"] = percentile(ratios, 90)
    return by_mode


GENERATION = "gen_01M85JSR67842W2YC56KNRN9TW"


def _entries(count: int) -> list[StreamEntry]:
    """A generation's events as stored: started, `count` one-token deltas, completed."""
    bodies = [
        event_body(
            EventType.GENERATION_STARTED,
            session_id="s",
            generation_id=GENERATION,
            seq=1,
            attempt=1,
            model=MODEL,
        )
    ]
    bodies += [
        event_body(EventType.DELTA, session_id="s", generation_id=GENERATION, seq=n + 2, content=" word")
        for n in range(count)
    ]
    usage = {"prompt_tokens": 9, "completion_tokens": count, "total_tokens": count + 9}
    bodies.append(
        event_body(
            EventType.GENERATION_COMPLETED,
            session_id="s",
            generation_id=GENERATION,
            seq=count + 2,
            finish_reason="stop",
            usage=usage,
        )
    )
    return [
        StreamEntry(StreamId(1_700_000_000_000 + n, 0), b"ep", encode_body(body).encode())
        for n, body in enumerate(bodies)
    ]


def per_event_cpu(events: int = 20_000, repeats: int = 7) -> dict[str, float]:
    """CPU-µs per event of each sink's live path, one entry per batch as at a real model's pace. Each sink's
    queue is taken after every event, as its response body does. The fastest of `repeats`: on shared cores,
    anything slower measured someone else's cache misses too."""
    entries = _entries(events)
    batches = [FrameBatch([entry]) for entry in entries]

    def sinks() -> dict[str, SseSink]:
        chat_fold = ChatStream(completion_id="chatcmpl-x", model=MODEL, created=0, include_usage=True)
        responses_fold = ResponseSse(ResponseEvents("resp_" + GENERATION[4:], {"model": MODEL}, created_at=0))
        responses_fold.opening()
        return {
            "native": SseSink(1 << 30),
            "chat": FoldingSink(GENERATION, chat_fold, 1 << 30),
            "responses": FoldingSink(GENERATION, responses_fold, 1 << 30),
        }

    timings: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode, sink in sinks().items():
            started = time.process_time()
            for batch in [FrameBatch(b.entries) for b in batches]:  # fresh batches: nothing cached
                sink.deliver(batch)
                sink.take()
            timings[mode].append((time.process_time() - started) / len(batches) * 1e6)
    return {mode: min(values) for mode, values in timings.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second per stream")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with running(Stack()) as stack:
        await phase(
            stack, "chat", -1, min(5, args.streams), 10, 0
        )  # warm-up: imports, connections, encodings
        for run in range(args.runs):
            await wait_until_quiet(max_wait=60)  # the cores are shared: start each run on a quiet machine
            for mode in MODES[run % 3 :] + MODES[: run % 3]:
                result = await phase(stack, mode, run, args.streams, args.tokens, args.rate)
                log(f"run {run} {mode}: API {result['api_cpu_us_per_token']:.1f} CPU-µs/token")
                runs.append(result)
    summary = summarize(runs)
    micro = per_event_cpu()
    summary["per_event_cpu_us"] = {
        **micro,
        "chat_added": micro["chat"] - micro["native"],
        "responses_added": micro["responses"] - micro["native"],
    }
    result = {
        "command": f"./dev bench front_door --streams {args.streams} --tokens {args.tokens} "
        f"--rate {args.rate:g} --runs {args.runs}",
        "summary": summary,
        "runs": [{k: v for k, v in run.items() if k != "time_to_first_token_ms"} for run in runs],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print("saved", save("front_door", result))


if __name__ == "__main__":
    asyncio.run(main())
