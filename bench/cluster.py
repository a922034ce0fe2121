"""The same loads on one Redis and on a Redis Cluster, side by side in one run: what the cluster costs per token.

    ./dev bench cluster [--generations 100,250] [--sessions 1000] [--runs 2] [--primaries 3] [--replicas 0]
    ./dev bench cluster --parts worker        # or fanout, writes; --merge keeps the other parts' results
    python -m bench.cluster ...

Both kinds run the very same code (the store's paths differ only in how calls are grouped: one script call per
flush on one Redis, one per slot on a cluster, pipelined per node). ``single`` is one embedded Valkey; ``cluster``
is an embedded cluster of ``--primaries`` primaries (`tokenfan.cli.embedded_cluster.EmbeddedCluster`) with
``--replicas`` replicas each. In both, the job queue lives on a Valkey of its own, so the data nodes' counters
hold the store's commands alone. Runs alternate which kind goes first, so drift on the shared machine hits both.

Part ``worker`` (`bench.worker`'s measured point, coalescing on): one ``tokenfan worker``, N sessions with one
long generation each from the lean upstream at ``--rate`` tokens/s, every session in its own slot (spread over
every primary). Per point: tokens appended per second, worker and Redis CPU per token, script calls and Redis
commands per token (``INFO commandstats``, inside scripts too), per node as well, and added latency (upstream
send to the measuring reader's receipt, `bench.live_reader`, one SSUBSCRIBE connection per node).

Part ``fanout`` (`bench.fanout`'s run): one ``tokenfan relay``, ``--sessions`` sessions with ``--per-session``
WebSocket subscribers each, all on that one relay; a producer appends deltas through `Store.write` at
``--session-rate`` tokens/s per session. Per run: append -> receipt latency p50/p99, relay CPU per token delivered,
Redis commands the relay sends per frame, and the relay's connections holding shard subscriptions per node
(``CLIENT LIST``: one per node, whatever the number of sessions).

Part ``writes``: the write path alone, in this process, where the shared machine's noise matters least:
CPU per item of `Store.write` with ``--items-per-flush`` generations in each flush (one event each, as at a
model's pace), fastest of 7 passes of 200 flushes, on one Redis and on the cluster; and on the cluster through
redis-py's own pipeline, on clients packing in Python, as a flush went before the store's own pipeline (the
reference: it asks SCRIPT EXISTS before each one).

Reported: medians per kind, and cluster ÷ single of each figure (``cluster_vs_single``), in
``bench/results/cluster.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from bench import fanout, worker
from bench.harness import RESULTS, Backend, log, median, save
from tokenfan.store import batch
from tokenfan.store.batch import ScriptCall

KINDS = ("single", "cluster")

#: Figures of the worker part compared as cluster ÷ single.
WORKER_FIGURES = (
    "tokens_appended_per_second",
    "worker_cpu_us_per_token",
    "redis_cpu_us_per_token",
    "script_calls_per_token",
    "redis_commands_per_token_including_inside_scripts",
    "added_latency_ms_p50",
    "added_latency_ms_p99",
)
#: Figures of the fan-out part compared as cluster ÷ single.
FANOUT_FIGURES = (
    "token_deliveries_per_second",
    "latency_ms_p50",
    "latency_ms_p99",
    "relay_cpu_us_per_token_delivered",
    "server_redis_commands_per_frame",
    "producer_cpu_us_per_token",
    "redis_cpu_us_per_token",
)


def ratios(
    single: dict[str, Any], cluster: dict[str, Any], figures: tuple[str, ...]
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in figures:
        a, b = single.get(key), cluster.get(key)
        out[key] = (
            round(b / a, 3) if isinstance(a, int | float) and isinstance(b, int | float) and a else None
        )
    return out


def order(run: int) -> tuple[str, ...]:
    """Which kind goes first alternates from run to run."""
    return KINDS if run % 2 == 0 else KINDS[::-1]


# --- part worker


def node_split(
    points: list[dict[str, Any]], commands: str, tokens: str, cores: str | None = None
) -> dict[str, Any]:
    """How one kind's load split over its nodes (medians over runs): per node, its share of the script calls,
    of the shard publishes and of all commands, its script calls, XADDs and SPUBLISHes per token appended (on
    every node together), and its cores. `commands`, `tokens` and `cores` name the figures of a point."""
    per_node: dict[str, dict[str, list[float]]] = {}
    for point in points:
        by_node: dict[str, dict[str, int]] = point[commands]
        appended = max(1, point[tokens])
        totals = {
            name: sum(calls.get(name, 0) for calls in by_node.values()) for name in ("evalsha", "spublish")
        }
        everything = sum(sum(calls.values()) for calls in by_node.values())
        for index, (node, calls) in enumerate(sorted(by_node.items())):
            figures = {
                "script_calls_share": calls.get("evalsha", 0) / max(1, totals["evalsha"]),
                "spublish_share": calls.get("spublish", 0) / max(1, totals["spublish"]),
                "commands_share": sum(calls.values()) / max(1, everything),
                **{
                    f"{name}_per_token": calls.get(name, 0) / appended
                    for name in ("evalsha", "xadd", "spublish")
                },
            }
            if cores is not None:
                figures["cores"] = point[cores][node]
            for key, value in figures.items():
                per_node.setdefault(f"node {index + 1}", {}).setdefault(key, []).append(value)
    return {
        node: {key: round(median(values), 4) for key, values in figures.items()}
        for node, figures in per_node.items()
    }


async def worker_part(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for count in [int(c) for c in args.generations.split(",") if c]:
        points: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for run in range(args.runs):
            for kind in order(run):
                backend = Backend(kind, args.primaries, args.replicas, separate_queue=True)
                point = worker.Point(worker.ON, count, backend=backend)
                tag = f"{kind[0]}{run}"
                result = await worker.measure_point(
                    point, args.rate, args.seconds, args.warmup, tag, args.quiet_wait
                )
                result["tokens_appended"] = round(
                    result["tokens_appended_per_second"] * result["window_seconds"]
                )
                points[kind].append(result)
                worker.print_row(f"{kind} {count} run {run}", result)
        single, cluster = worker.headline(points["single"]), worker.headline(points["cluster"])
        out[str(count)] = {
            "single": single,
            "cluster": cluster,
            "cluster_vs_single": ratios(single, cluster, WORKER_FIGURES),
            "cluster_nodes": node_split(
                points["cluster"],
                "redis_commands_in_window_by_node",
                "tokens_appended",
                "redis_cpu_share_by_node",
            ),
            "runs": points,
        }
        log(f"worker {count}: cluster/single {out[str(count)]['cluster_vs_single']}")
    return out


# --- part fanout


async def shard_connections(bench: fanout.Bench) -> dict[str, list[int]]:
    """Per node: [connections holding shard subscriptions, shard channels they hold] (CLIENT LIST)."""
    found: dict[str, list[int]] = {}
    for node, control in zip(bench.redis.node_names(), bench.controls, strict=True):
        clients = await control.client_list()
        held = [
            int(client.get("ssub", 0))
            for client in clients
            if not client.get("name", "").startswith("bench-")
        ]
        found[node] = [sum(1 for n in held if n), sum(held)]
    return found


async def watch_shards(bench: fanout.Bench, most: dict[str, list[int]]) -> None:
    """Keep, per node, the most shard channels seen held (and by how many connections) until cancelled."""
    while True:
        for node, (connections, channels) in (await shard_connections(bench)).items():
            if channels >= most.get(node, [0, 0])[1]:
                most[node] = [connections, channels]
        await asyncio.sleep(0.5)


async def fanout_run(bench: fanout.Bench, scenario: fanout.Scenario) -> dict[str, Any]:
    """One run on a fresh relay: subscribers connect, the producer appends, a window is measured."""
    server = fanout.relay_server(bench.redis).start()
    most: dict[str, list[int]] = {}
    watching = asyncio.create_task(watch_shards(bench, most))
    try:
        target = fanout.Target("relay", server)
        run = await bench.run(target, scenario.sessions, scenario.per_session, bench.produce(scenario.rate))
        await target.http.aclose()
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        server.stop()
    delivered = run["token_deliveries_per_second"] * run["seconds"]
    run["relay_cpu_us_per_token_delivered"] = run["cpu_seconds"]["relay"] / max(1.0, delivered) * 1e6
    run["relay_shard_connections_by_node"] = {node: pair[0] for node, pair in most.items()}
    run["relay_shard_channels_by_node"] = {node: pair[1] for node, pair in most.items()}
    run["commands_by_node"] = {
        node: {name: n for name, n in calls.items() if name not in fanout._BENCH_COMMANDS}
        for node, calls in run["calls_by_node"].items()
    }
    return run


async def fanout_part(args: argparse.Namespace) -> dict[str, Any]:
    scenario = fanout.Scenario("sessions", args.sessions, args.per_session, args.session_rate)
    load = fanout.LoadGenerator(args.clients, max_seconds=3600)
    backends = {
        kind: Backend(kind, args.primaries, args.replicas, separate_queue=True).start() for kind in KINDS
    }
    benches = {
        kind: fanout.Bench(
            backend, fanout.Producer(backend), load, args.fanout_seconds, args.fanout_warmup, args.runs
        )
        for kind, backend in backends.items()
    }
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    log(
        f"fan-out: {scenario.sessions} sessions x {scenario.per_session}, {scenario.rate:g} tok/s each, one relay"
    )
    try:
        for run in range(args.runs):
            for kind in order(run):
                result = await fanout_run(benches[kind], scenario)
                runs[kind].append(result)
                log(
                    fanout.line(kind[:5], result)
                    + f"  shard connections {result['relay_shard_connections_by_node']}"
                )
    finally:
        for bench in benches.values():
            await bench.producer.close()
            await bench.close()
        load.close()
        for backend in backends.values():
            backend.close()
    single, cluster = fanout.medians(runs["single"]), fanout.medians(runs["cluster"])
    return {
        "scenario": scenario.__dict__,
        "single": single,
        "cluster": cluster,
        "cluster_vs_single": ratios(single, cluster, FANOUT_FIGURES),
        "cluster_nodes": node_split(runs["cluster"], "commands_by_node", "tokens_appended"),
        "runs": runs,
    }


# --- part writes


async def redis_py_pipeline(client: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """The reference: the same calls through redis-py's own pipeline, which asks SCRIPT EXISTS first."""
    async with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            await script(keys=keys, args=args, client=pipe)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies


async def write_path(kind: str, items_per_flush: int, reference: bool, passes: int = 7) -> dict[str, float]:
    """CPU per item of `Store.write` in this process (one delta per item, as at a model's pace, built as the
    fan-out benchmark's producer builds them), fastest of `passes` passes of 200 flushes, and the median wall
    time of a flush. `reference`: through redis-py's pipeline, on clients packing in Python (how a cluster's
    flush went before)."""
    backend = Backend(kind, separate_queue=True).start()
    producer = fanout.Producer(backend)
    send = batch._send
    if reference:
        batch._send = redis_py_pipeline
    else:
        producer.store.topology.pack_with_hiredis()
    try:
        streams = await producer.open([f"w-{kind}-{n}" for n in range(items_per_flush)])
        ones = [1] * items_per_flush
        for _ in range(20):
            await producer.write(streams, ones)
        cpu, wall = [], []
        for _ in range(passes):
            started, at = time.process_time(), time.perf_counter()
            for _ in range(200):
                await producer.write(streams, ones)
            cpu.append((time.process_time() - started) / 200 / items_per_flush * 1e6)
            wall.append((time.perf_counter() - at) / 200 * 1e3)
        return {"cpu_us_per_item": round(min(cpu), 2), "wall_ms_per_flush": round(median(wall), 3)}
    finally:
        batch._send = send
        await producer.close()
        backend.close()


async def writes_part(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    variants = [("single", False), ("cluster", False), ("cluster", True)]
    for count in [int(c) for c in args.items_per_flush.split(",") if c]:
        found: dict[str, list[dict[str, float]]] = {}
        for run in range(args.runs):
            for kind, reference in variants if run % 2 == 0 else variants[::-1]:
                name = f"{kind} (redis-py pipeline)" if reference else kind
                found.setdefault(name, []).append(await write_path(kind, count, reference))
                log(f"write path, {count} items per flush, {name}: {found[name][-1]}")
        summary = {
            name: {key: median([run[key] for run in runs]) for key in runs[0]} for name, runs in found.items()
        }
        single = summary["single"]["cpu_us_per_item"]
        out[str(count)] = {
            **summary,
            "cluster_vs_single_cpu": round(summary["cluster"]["cpu_us_per_item"] / single, 3),
            "redis_py_pipeline_vs_single_cpu": round(
                summary["cluster (redis-py pipeline)"]["cpu_us_per_item"] / single, 3
            ),
            "runs": found,
        }
    return out


# --- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", default="worker,fanout,writes", help="comma-separated: worker, fanout, writes"
    )
    parser.add_argument("--runs", type=int, default=2, help="runs of each kind per figure (medians reported)")
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument(
        "--replicas", type=int, default=0, help="replicas per primary (they cost Redis CPU only)"
    )
    parser.add_argument("--generations", default="100,250", help="worker part: concurrent generations")
    parser.add_argument("--rate", type=float, default=50.0, help="worker part: tokens/s per generation")
    parser.add_argument("--seconds", type=float, default=10.0, help="worker part: measured window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="longest wait for the machine to calm")
    parser.add_argument("--sessions", type=int, default=1000, help="fan-out part: sessions on the relay")
    parser.add_argument("--per-session", type=int, default=3, help="fan-out part: subscribers per session")
    parser.add_argument("--session-rate", type=float, default=5.0, help="fan-out part: tokens/s per session")
    parser.add_argument("--fanout-seconds", type=float, default=5.0)
    parser.add_argument("--fanout-warmup", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=3, help="fan-out part: subscriber processes")
    parser.add_argument(
        "--items-per-flush", default="25,100", help="writes part: generations carried by one flush"
    )
    parser.add_argument("--merge", action="store_true", help="keep the saved results of the parts not run")
    parser.add_argument("--output", default="cluster", help="results name (bench/results/NAME.json)")
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    parts = set(filter(None, args.parts.split(",")))
    command = " ".join(["./dev bench cluster", *sys.argv[1:]])
    result: dict[str, Any] = {
        "command": command,
        "primaries": args.primaries,
        "replicas_per_primary": args.replicas,
        "settings": {part: vars(args) for part in parts},  # each part as it was last measured
    }
    if "worker" in parts:
        result["worker"] = await worker_part(args)
    if "fanout" in parts:
        result["fanout"] = await fanout_part(args)
    if "writes" in parts:
        result["writes"] = await writes_part(args)
    path = RESULTS / f"{args.output}.json"
    if args.merge and path.exists():
        kept = json.loads(path.read_text())
        for part in ("worker", "writes", "settings"):  # points at other counts are kept too
            if part in kept and part in result:
                result[part] = {**kept[part], **result[part]}
        result = {**kept, **result, "command": kept.get("command", command) + " ; " + command}
    summary = {
        f"worker {count}": point["cluster_vs_single"] for count, point in result.get("worker", {}).items()
    }
    if "fanout" in result:
        summary["fanout"] = result["fanout"]["cluster_vs_single"]
    for count, point in result.get("writes", {}).items():
        summary[f"writes {count}"] = {k: v for k, v in point.items() if k.endswith("_cpu")}
    print(json.dumps(summary, indent=2))
    print("saved", save(args.output, result))
    shutil.rmtree(worker.LOGS, ignore_errors=True)
    shutil.rmtree(fanout.LOGS, ignore_errors=True)


if __name__ == "__main__":
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
