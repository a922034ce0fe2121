"""Tokens per second through one worker and one relay, beside the upstream read directly by the openai client.

    ./dev bench throughput [--sessions 50] [--tokens 400] [--subscribers 2] [--runs 3]

Baseline: the same number of concurrent streams from the same simulator, consumed directly with
``openai.AsyncOpenAI`` (what any single program reading the upstream gets, with no queue, no Redis, no relay).
Measured: the full path, POST -> arq -> worker -> Redis -> relay -> WebSocket subscribers, from the first POST
until every subscriber holds every completed generation. Everything shares this machine's cores, the load
generator included, so per-process CPU seconds are reported next to the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx
import openai
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from bench.harness import Stack, command_calls, cpu_delta, median, percentile, running, save


async def direct_baseline(base_url: str, sessions: int, tokens: int) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unset", max_retries=0)

    async def one(n: int) -> int:
        stream = await client.chat.completions.create(
            model="tokenfan-sim",
            messages=[{"role": "user", "content": f"direct {n} <<sim {json.dumps({'tokens': tokens})}>>"}],
            stream=True,
        )
        pieces = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
        return pieces

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(n) for n in range(sessions)))
    elapsed = time.perf_counter() - started
    await client.close()
    return {"tokens_per_second": sum(counts) / elapsed, "seconds": elapsed}


async def pipeline_run(
    stack: Stack, sessions: int, tokens: int, subscribers: int, run: int
) -> dict[str, Any]:
    relay, api = stack.url("relay"), stack.url("api")
    assert stack.redis is not None
    redis = Redis.from_url(stack.redis.url)
    session_ids = [f"bench-{run}-{n}" for n in range(sessions)]
    sockets = [
        await connect(f"{relay}/v1/sessions/{sid}/stream", max_size=None)
        for sid in session_ids
        for _ in range(subscribers)
    ]
    first_delta: dict[str, float] = {}
    posted: dict[str, float] = {}
    delivered = 0

    async def consume(websocket: Any, session_id: str) -> None:
        nonlocal delivered
        async for message in websocket:
            frame = json.loads(message)
            if frame["type"] == "delta":
                delivered += 1
                first_delta.setdefault(session_id, time.perf_counter())
            elif frame["type"].startswith("generation.") and frame["type"] != "generation.started":
                return

    readers = [
        asyncio.create_task(consume(ws, session_ids[i // subscribers])) for i, ws in enumerate(sockets)
    ]
    cpu_before, calls_before = stack.cpu(), await command_calls(redis)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:

        async def post(session_id: str) -> None:
            posted[session_id] = time.perf_counter()
            body = {
                "model": "tokenfan-sim",
                "messages": [
                    {"role": "user", "content": f"{session_id} <<sim {json.dumps({'tokens': tokens})}>>"}
                ],
            }
            response = await client.post(f"/v1/sessions/{session_id}/generations", json=body)
            response.raise_for_status()

        await asyncio.gather(*(post(sid) for sid in session_ids))
        await asyncio.gather(*readers)
    elapsed = time.perf_counter() - started
    cpu, calls = cpu_delta(cpu_before, stack.cpu()), await command_calls(redis)
    for websocket in sockets:
        await websocket.close()
    await redis.aclose()
    appended = sessions * tokens
    script_calls = calls.get("evalsha", 0) - calls_before.get("evalsha", 0)
    all_calls = sum(calls.values()) - sum(calls_before.values())
    ttft = [(first_delta[sid] - posted[sid]) * 1000 for sid in session_ids if sid in first_delta]
    return {
        "seconds": elapsed,
        "tokens_appended_per_second": appended / elapsed,
        "token_deliveries_per_second": appended * subscribers / elapsed,
        "delta_frames_received": delivered,
        "tokens_per_delta_frame": appended * subscribers / max(delivered, 1),
        "time_to_first_token_ms_p50": percentile(ttft, 50),
        "time_to_first_token_ms_p99": percentile(ttft, 99),
        "script_calls_per_token": script_calls / appended,
        "redis_commands_per_token_including_inside_scripts": all_calls / appended,
        "cpu_seconds": cpu,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with running(Stack()) as stack:
        simulator = stack.url("simulator") + "/v1"
        baselines = [await direct_baseline(simulator, args.sessions, args.tokens) for _ in range(args.runs)]
        runs = [
            await pipeline_run(stack, args.sessions, args.tokens, args.subscribers, run)
            for run in range(args.runs)
        ]
    direct = median([b["tokens_per_second"] for b in baselines])
    summary = {key: median([run[key] for run in runs]) for key in runs[0] if key != "cpu_seconds"}
    result = {
        "command": f"./dev bench throughput --sessions {args.sessions} --tokens {args.tokens} "
        f"--subscribers {args.subscribers} --runs {args.runs}",
        "direct_openai_tokens_per_second": direct,
        "pipeline": summary,
        "pipeline_vs_direct": summary["tokens_appended_per_second"] / direct,
        "cpu_seconds_per_run": [run["cpu_seconds"] for run in runs],
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print("saved", save("throughput", result))


if __name__ == "__main__":
    asyncio.run(main())
