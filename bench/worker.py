"""One worker process: concurrent generations held, tokens appended per second, Redis commands per token and
added latency, with coalescing on and off in the same run.

    ./dev bench worker [--generations 500] [--rate 50] [--seconds 20] [--runs 3] [--quick]
    ./dev bench worker --only versions --baseline-worker DIR --merge   # another worker/ beside this one
    ./dev bench worker --report                                        # the saved results as tables
    python -m bench.worker ...

Per measured point, a fresh stack of real processes on loopback:

* an embedded Valkey (`tokenfan.cli.embedded_redis.EmbeddedRedis`), or for `bench.cluster` an embedded
  Redis Cluster with the job queue on a Valkey of its own (`bench.harness.Backend`);
* a lean streaming upstream (`bench.fast_upstream`), one chunk per token at ``--rate`` tokens/s per stream,
  each token's content being its send time;
* ONE ``tokenfan worker --concurrency 1000`` with the variant's coalescing settings (or several, each
  taking its share: ``--versions-workers``, ``--sweep-workers``);
* the measuring reader (`bench.live_reader`), its own process: ``SSUBSCRIBE`` to every session's live
  channel (one connection per node) sees every appended entry the moment Redis publishes it, and records
  each token's latency from its send at the upstream.

This process creates N sessions with one generation each (`Store.accept` + `enqueue_generation`, as the API
does), long enough to outlast the measurement, waits until the upstream has all N streams open, lets them run
``--warmup`` seconds, then measures over a window of ``--seconds``:

* tokens appended per second: tokens the reader received during the window;
* Redis commands per token: the ``INFO commandstats`` delta over the window, as script calls (``evalsha``)
  and as all commands including those run inside scripts. In that window only the worker talks to Redis,
  besides the reader (its probe ``SPUBLISH``es are subtracted) and this process's ``INFO`` calls
  (excluded); on a cluster, per node too;
* added latency p50/p99: receive time at the reader minus send time at the upstream, over every token sent
  within the window; and the reader's own lag (its probes, published straight to Redis);
* CPU seconds and share of one core of each process, the machine's idle share, and the worker's RSS;
* generations held: streams the upstream had open at every 1 s sample of the window (all N throughout?).

Variants: ``on`` is the default (``TOKENFAN_COALESCE=true``, ``TOKENFAN_FLUSH_WINDOW_MS=5``); ``off`` is the
naive baseline (``TOKENFAN_COALESCE=false``: one event per token, each written by its own script call as
soon as it arrives). A sweep over the number of generations shows where one worker saturates, and one over
the flush window (0, 5, 20 ms) what the window buys.

Part ``metrics`` (``--only metrics``): the default worker without a metrics port and with one
(``TOKENFAN_METRICS_PORT``, scraped once a second during the window, as an eager Prometheus would), in pairs
whose order alternates, at each of ``--metrics-at``: what the instruments cost per token.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from bench.harness import (
    RESULTS,
    Backend,
    calls_delta,
    cpu_seconds,
    log,
    machine_jiffies,
    median,
    percentile,
    rss_bytes,
    save,
    summed,
    wait_until_quiet,
)
from tokenfan.cli.processes import ChildProcess
from tokenfan.contract.ids import new_generation_id
from tokenfan.store.jobs import create_queue, enqueue_generation

ROOT = Path(__file__).resolve().parent.parent
LOGS = Path(tempfile.mkdtemp(prefix="tokenfan-bench-worker-"))
#: Seconds allowed for N generations to start (a saturated worker starts them slowly); the window begins
#: after all started or after this long, whichever comes first. Generations are sized to outlast both.
START_ALLOWANCE = 60.0
#: After the window, how long the reader keeps listening for tokens sent within it.
GRACE = 2.0


@dataclass(frozen=True)
class Variant:
    name: str
    coalesce: bool
    flush_window_ms: float
    worker_path: str | None = None  # import the `worker` package from here instead of this checkout
    metrics: bool = False  # serve /metrics (scraped every second during the window)
    workers: int = 1  # worker processes sharing the generations

    def env(self) -> dict[str, str]:
        env = {
            "TOKENFAN_COALESCE": "true" if self.coalesce else "false",
            "TOKENFAN_FLUSH_WINDOW_MS": f"{self.flush_window_ms:g}",
            # The worker's own transport, as measured in docs/BENCHMARKS.md (an older worker ignores it).
            "TOKENFAN_UPSTREAM_TRANSPORT": "tokenfan",
        }
        if self.metrics:
            env["TOKENFAN_METRICS_PORT"] = "0"
        return env


ON = Variant("on", True, 5.0)
OFF = Variant("off", False, 0.0)
ON_METRICS = Variant("on-metrics", True, 5.0, metrics=True)


@dataclass
class Point:
    variant: Variant
    generations: int
    label: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    backend: Backend = field(default_factory=Backend)  # where the sessions live (started with the point)


# --- processes


def base_env(redis: dict[str, str]) -> dict[str, str]:
    """The environment of the bench's child processes; `redis` is `Backend.env()`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENFAN_", "OPENAI_"))}
    env.update(
        **redis,
        TOKENFAN_LOG_LEVEL="warning",
        TOKENFAN_LOG_FORMAT="json",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


class BenchProcess:
    """A bench module as a child process, ready when it writes its ready file."""

    def __init__(self, name: str, module: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.ready_file = LOGS / f"{name}.ready"
        self.command = [sys.executable, "-m", module, *args, "--ready-file", str(self.ready_file)]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> BenchProcess:
        self.ready_file.unlink(missing_ok=True)
        with (LOGS / f"{self.name}.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                self.command, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; see {LOGS / (self.name + '.log')}")
            time.sleep(0.02)
        self.url = str(json.loads(self.ready_file.read_text())["url"])
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- one measured point


@dataclass
class Stack:
    redis: Backend
    upstream: BenchProcess
    reader: BenchProcess
    workers: list[ChildProcess]
    out: Path

    def pids(self) -> dict[str, int]:
        return {
            **{f"worker-{n}": worker.pid for n, worker in enumerate(self.workers)},
            "upstream": self.upstream.pid,
            "reader": self.reader.pid,
            "bench": os.getpid(),
        }

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process; ``worker``: every worker process together; ``redis``: every
        data node together."""
        usage = {name: cpu_seconds(pid) for name, pid in self.pids().items()}
        workers = sum(v for k, v in usage.items() if k.startswith("worker-"))
        return {**usage, "worker": workers, "redis": self.redis.cpu_seconds()}

    def node_cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.redis.node_pids().items()}

    def stop(self) -> None:
        for worker in self.workers:  # all at once: each takes up to a few seconds to drain
            if worker.process is not None and worker.alive():
                worker.process.terminate()
        for worker in self.workers:
            worker.stop(timeout=30)
        self.reader.stop()
        self.upstream.stop()
        self.redis.close()


def session_prefix(name: str) -> str:
    """The sessions of the point `name` are this prefix followed by 0 .. N-1."""
    return f"bench-{name}-"


def start_stack(point: Point, rate: float, tokens: int, name: str) -> Stack:
    variant = point.variant
    redis = point.backend.start()
    env = base_env(redis.env())
    out = LOGS / name
    upstream = BenchProcess(
        f"{name}-upstream", "bench.fast_upstream", ["--rate", f"{rate:g}", "--tokens", str(tokens)], env
    ).start()
    sessions = ["--sessions-prefix", session_prefix(name), "--sessions", str(point.generations)]
    cluster = ["--cluster"] if redis.is_cluster else []
    reader = BenchProcess(
        f"{name}-reader",
        "bench.live_reader",
        ["--redis-url", redis.url, *cluster, *sessions, "--out", str(out)],
        env,
    ).start()
    worker_env = {**env, "OPENAI_BASE_URL": upstream.url + "/v1", **variant.env()}
    if variant.worker_path:  # another version of the worker, against the same everything else
        worker_env["PYTHONPATH"] = os.pathsep.join([variant.worker_path, env["PYTHONPATH"]])
        worker_env["PYTHONSAFEPATH"] = "1"  # or `python -m` puts the working directory (this checkout) first
    # Each worker takes at most its share: arq hands a polling worker every job it has room for, so
    # without a cap the first to poll would run them all.
    concurrency = str(1000 if variant.workers == 1 else -(-point.generations // variant.workers))
    workers = []
    for n in range(variant.workers):
        with (LOGS / f"{name}-worker-{n}.log").open("ab") as stderr:
            worker = ChildProcess(
                "worker", ["--concurrency", concurrency], env=worker_env, stderr=stderr, name=f"worker-{n}"
            )
            workers.append(worker.start())
    for worker in workers:
        worker.wait_ready()
    return Stack(redis, upstream, reader, workers, out)


async def upstream_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def create_generations(redis: Backend, count: int, tokens: int, rate: float, tag: str) -> None:
    """What the API does for each POST: accept the generation, enqueue its job (one session each)."""
    store = redis.store()
    queue = await create_queue(redis.queue_url)
    directive = json.dumps({"tokens": tokens, "rate": rate})
    try:
        for n in range(count):
            session_id, generation_id = f"{session_prefix(tag)}{n}", new_generation_id()
            request = {
                "model": "bench-upstream",
                "messages": [{"role": "user", "content": f"bench {n} <<fast {directive}>>"}],
            }
            await store.accept(session_id, generation_id, request=request, model="bench-upstream")
            await enqueue_generation(queue, session_id, generation_id)
    finally:
        await queue.aclose()
        await store.close()


def ms(value: float) -> float | None:
    """A latency for the results: rounded, or None when nothing was measured."""
    return None if value != value else round(value, 2)


def read_pairs(path: Path) -> tuple[array[int], array[int]]:
    """An int64 file of (send ns, latency ns) pairs, as two arrays."""
    raw = array("q")
    if path.exists():
        with path.open("rb") as file:
            raw.frombytes(file.read())
    return raw[0::2], raw[1::2]


def worst_second(sends: array[int], latencies: array[int], t0: int, t1: int) -> float:
    """The highest p99 latency (ms) of the tokens sent in any one second of the window: a stall of the worker
    (a collection, a heartbeat) shows here even when the window's p99 hides it."""
    buckets: dict[int, list[float]] = {}
    for sent, latency in zip(sends, latencies, strict=True):
        if t0 <= sent < t1:
            buckets.setdefault((sent - t0) // 1_000_000_000, []).append(latency / 1e6)
    return max((percentile(values, 99) for values in buckets.values()), default=float("nan"))


async def measure_point(
    point: Point, rate: float, seconds: float, warmup: float, tag: str, quiet_wait: float
) -> dict[str, Any]:
    quiet = await wait_until_quiet(quiet_wait)
    n = point.generations
    tokens = int(rate * (START_ALLOWANCE + warmup + seconds + GRACE + 3))
    name = f"{tag}-{point.variant.name}-{n}"
    stack = start_stack(point, rate, tokens, name)
    try:
        async with httpx.AsyncClient(base_url=stack.upstream.url, timeout=10) as http:
            created = time.monotonic()
            await create_generations(stack.redis, n, tokens, rate, name)
            while (await upstream_stats(http))["streams_open"] < n:
                if time.monotonic() - created > START_ALLOWANCE:
                    log(f"{name}: not all {n} generations started within {START_ALLOWANCE:g}s; measuring")
                    break
                await asyncio.sleep(0.1)
            start_seconds = time.monotonic() - created
            await asyncio.sleep(warmup)
            await http.post("/stats/reset")
            pids = stack.pids()
            calls_before = await stack.redis.command_calls()
            cpu_before, busy_before, nodes_before = stack.cpu(), machine_jiffies(), stack.node_cpu()
            up_before = await upstream_stats(http)
            t0 = time.time_ns()
            w0 = time.monotonic()
            open_samples, rss_samples = [], []
            while (left := w0 + seconds - time.monotonic()) > 0:
                await asyncio.sleep(min(1.0, left))
                open_samples.append((await upstream_stats(http))["streams_open"])
                rss_samples.append(max(rss_bytes(pids[f"worker-{w}"]) for w in range(len(stack.workers))))
                if point.variant.metrics:  # a scrape costs the worker too: count it in
                    for worker in stack.workers:
                        (await http.get(worker.metrics_url)).raise_for_status()
            t1 = time.time_ns()
            cpu_after, busy_after, nodes_after = stack.cpu(), machine_jiffies(), stack.node_cpu()
            calls_after = await stack.redis.command_calls()
            up_after = await upstream_stats(http)
            window = (t1 - t0) / 1e9
            await asyncio.sleep(GRACE)
        stack.reader.stop()
    finally:
        stack.stop()

    sends, latencies = read_pairs(stack.out / "tokens.bin")
    probe_sends, probe_latencies = read_pairs(stack.out / "probes.bin")
    reader_summary = json.loads((stack.out / "summary.json").read_text())
    lifecycle = json.loads((stack.out / "events.json").read_text())
    in_window = [lat / 1e6 for sent, lat in zip(sends, latencies, strict=True) if t0 <= sent < t1]
    received_in_window = sum(1 for sent, lat in zip(sends, latencies, strict=True) if t0 <= sent + lat < t1)
    probes = [lat / 1e6 for sent, lat in zip(probe_sends, probe_latencies, strict=True) if t0 <= sent < t1]
    probe_publishes = sum(1 for sent in probe_sends if t0 <= sent < t1)
    by_node = calls_delta(calls_before, calls_after)
    for calls in by_node.values():  # the reader probes every node alike
        calls["spublish"] = calls.get("spublish", 0) - round(probe_publishes / len(by_node))
    delta = summed(by_node)
    script_calls = delta.get("evalsha", 0) + delta.get("eval", 0)
    all_commands = sum(delta.values())
    cpu = {k: round(cpu_after[k] - cpu_before[k], 3) for k in cpu_after}
    sent_in_window = up_after["tokens_sent"] - up_before["tokens_sent"]
    completed_early = up_after["streams_completed"] - up_before["streams_completed"]
    busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    other_cores = busy * (os.cpu_count() or 1) - sum(cpu.values()) / window
    appended = received_in_window
    return {
        "generations": n,
        "variant": point.variant.name,
        "workers": point.variant.workers,
        "coalesce": point.variant.coalesce,
        "flush_window_ms": point.variant.flush_window_ms,
        "rate_per_generation": rate,
        "window_seconds": round(window, 3),
        "seconds_to_start_all": round(start_seconds, 2),
        "generations_open_min": min(open_samples, default=0),
        "generations_open_max": max(open_samples, default=0),
        "generations_completed_in_window": completed_early,
        "held_all_throughout": min(open_samples, default=0) == n and completed_early == 0,
        "tokens_offered_per_second": round(sent_in_window / window),
        "tokens_appended_per_second": round(appended / window),
        "tokens_sent_in_window_seen": round(len(in_window) / max(1, sent_in_window), 4),
        "added_latency_ms_p50": ms(percentile(in_window, 50)),
        "added_latency_ms_p90": ms(percentile(in_window, 90)),
        "added_latency_ms_p99": ms(percentile(in_window, 99)),
        "added_latency_ms_max": ms(max(in_window, default=float("nan"))),
        "added_latency_ms_p99_worst_second": ms(worst_second(sends, latencies, t0, t1)),
        "reader_probe_ms_p50": ms(percentile(probes, 50)),
        "reader_probe_ms_p99": ms(percentile(probes, 99)),
        "script_calls_per_token": round(script_calls / max(1, appended), 4),
        "redis_commands_per_token_including_inside_scripts": round(all_commands / max(1, appended), 3),
        "script_calls_per_second": round(script_calls / window),
        "tokens_per_script_call": round(appended / max(1, script_calls), 1),
        "tokens_per_delta_event": round(
            reader_summary["tokens"] / max(1, reader_summary["delta_messages"]), 2
        ),
        "redis_commands_in_window": delta,
        "redis_commands_in_window_by_node": by_node,
        "redis_cpu_share_by_node": {
            node: round((nodes_after[node] - nodes_before[node]) / window, 3) for node in nodes_after
        },
        "cpu_seconds": cpu,
        "cpu_share_of_one_core": {k: round(v / window, 3) for k, v in cpu.items()},
        "worker_cpu_us_per_token": round(cpu["worker"] / max(1, appended) * 1e6, 1),
        # Per token the upstream sent in the window: what part 'metrics' compares (it needs no reader).
        "worker_cpu_us_per_token_offered": round(cpu["worker"] / max(1, sent_in_window) * 1e6, 2),
        "redis_cpu_us_per_token": round(cpu["redis"] / max(1, appended) * 1e6, 1),
        "machine_busy_share": round(busy, 3),
        "other_processes_cores": round(max(0.0, other_cores), 2),
        "other_processes_cores_before": round(quiet, 2),
        "worker_rss_mib": round(max(rss_samples, default=0) / 2**20, 1),
        "upstream_tick_lateness_ms_p99": up_after["tick_lateness_ms_p99"],
        "reader": reader_summary,
        "lifecycle_events": len(lifecycle),
    }


# --- the run


def headline(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of every numeric figure (None when a run measured nothing)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float | None) and not isinstance(v, bool)]
    summary: dict[str, Any] = {}
    for key in keys:
        values = [run[key] for run in runs]
        summary[key] = None if None in values else median(values)
    summary["held_all_throughout"] = all(run["held_all_throughout"] for run in runs)
    summary["variant"] = runs[0]["variant"]
    summary["cpu_share_of_one_core"] = {
        name: median([run["cpu_share_of_one_core"][name] for run in runs])
        for name in runs[0]["cpu_share_of_one_core"]
    }
    return summary


def print_row(label: str, r: dict[str, Any]) -> None:
    log(
        f"{label:>22}: held {r['generations_open_min']}/{r['generations']}  "
        f"appended {r['tokens_appended_per_second']:>6}/s of {r['tokens_offered_per_second']:>6}/s  "
        f"p50 {r['added_latency_ms_p50']!s:>7} ms  p99 {r['added_latency_ms_p99']!s:>8} ms  "
        f"tok/event {r['tokens_per_delta_event']}  scripts/tok {r['script_calls_per_token']:.4f}  cmds/tok {r['redis_commands_per_token_including_inside_scripts']:.2f}  "
        f"worker {r['cpu_share_of_one_core']['worker']:.2f} core {r['worker_cpu_us_per_token']} us/tok  redis {r['cpu_share_of_one_core']['redis']:.2f}  "
        f"others {r['other_processes_cores']:.2f} cores  probe p99 {r['reader_probe_ms_p99']} ms"
    )


async def validate_upstream() -> dict[str, Any]:
    """The lean upstream speaks the wire format: the official client's typed path parses one of its streams
    (content, finish reason, usage), as does its generic path, which the worker uses."""
    env = base_env({"REDIS_URL": "redis://unused"})
    upstream = BenchProcess("validate-upstream", "bench.fast_upstream", ["--rate", "1000"], env).start()
    client = openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="unset", max_retries=0)
    try:
        content = f"check <<fast {json.dumps({'tokens': 5, 'rate': 1000})}>>"
        stream = await client.chat.completions.create(
            model="bench-upstream",
            messages=[{"role": "user", "content": content}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        sent = [int(piece) for piece in "".join(pieces).split()]
        if usage is None or usage.completion_tokens != 5 or len(pieces) != 5 or finish != "stop":
            raise RuntimeError(f"the bench upstream's stream did not parse: {pieces} {finish} {usage}")
        if sorted(sent) != sent:
            raise RuntimeError(f"the bench upstream's stream did not parse: {pieces} {finish} {usage}")
        return {"typed_client_tokens": len(pieces), "finish_reason": finish, "usage": usage.model_dump()}
    finally:
        await client.close()
        upstream.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generations", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second per generation")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3, help="runs of the on/off pair at --generations")
    parser.add_argument("--sweep", default="25,100,250,750", help="other generation counts, coalescing on")
    parser.add_argument(
        "--sweep-off",
        default="25,100,250",
        help="other generation counts, coalescing off (it saturates early)",
    )
    parser.add_argument("--windows", default="0,20", help="other flush windows (ms), coalescing on")
    parser.add_argument(
        "--windows-at", default="100,500", help="generation counts at which to try the other flush windows"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120.0, help="longest wait for other processes to calm down"
    )
    parser.add_argument("--variants", default="on,off", help="which of the pair to run")
    parser.add_argument(
        "--baseline-worker",
        help="a directory holding another version of the worker/ package, measured beside this one (part "
        "'versions', coalescing on, at --versions-at)",
    )
    parser.add_argument("--versions-at", default="100,250")
    parser.add_argument(
        "--versions-workers",
        default="1",
        help="worker processes of part 'versions' (each count, both versions)",
    )
    parser.add_argument(
        "--sweep-workers", type=int, default=1, help="worker processes of the sweep's 'on' points"
    )
    parser.add_argument(
        "--metrics-at", default="100,250", help="generation counts of part 'metrics' (metrics port off vs on)"
    )
    parser.add_argument(
        "--merge", action="store_true", help="update the parts measured in the saved results, keep the rest"
    )
    parser.add_argument("--quick", action="store_true", help="one short run of the on/off pair only")
    parser.add_argument("--output", default="", help="results file name (bench/results/NAME.json)")
    parser.add_argument(
        "--only", default="", help="comma-separated subset: pair, sweep, windows, versions, metrics"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.runs, args.sweep, args.sweep_off, args.windows = (
            6.0,
            2.0,
            1,
            "",
            "",
            "",
        )
    args.parts = set(filter(None, args.only.split(","))) or {
        "pair",
        "sweep",
        "windows",
        "versions",
        "metrics",
    }
    if not args.baseline_worker:
        args.parts.discard("versions")
    if args.quick and "metrics" not in args.only:
        args.parts.discard("metrics")
    return args


def summarize(args: argparse.Namespace, pair: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The on/off comparison at --generations (medians over runs), side by side, and the target verdicts."""
    on, off = headline(pair["on"]), headline(pair["off"])
    ratios = {
        key: round(on[key] / off[key], 4) if on[key] is not None and off[key] else None
        for key in (
            "tokens_appended_per_second",
            "script_calls_per_token",
            "redis_commands_per_token_including_inside_scripts",
            "added_latency_ms_p50",
            "added_latency_ms_p99",
            "worker_cpu_us_per_token",
            "redis_cpu_us_per_token",
        )
    }
    verdict = {
        "held_all_generations": bool(on["held_all_throughout"] and on["generations"] >= 500),
        "appended_vs_offered": round(on["tokens_appended_per_second"] / on["tokens_offered_per_second"], 3),
        "script_calls_per_token": on["script_calls_per_token"],
        "script_calls_target_met": on["script_calls_per_token"] < 0.2,
        "p99_ms": on["added_latency_ms_p99"],
        "p99_target_met": on["added_latency_ms_p99"] is not None and on["added_latency_ms_p99"] < 20,
    }
    return {"on": on, "off": off, "on_vs_off": ratios, "verdict": verdict}


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def report(path: Path) -> str:
    """The saved results as the markdown tables of docs/BENCHMARKS.md (``--report``)."""
    r = json.loads(path.read_text())

    def row(label: str, p: dict[str, Any]) -> str:
        cores = p["cpu_share_of_one_core"]
        return (
            f"| {label} | {p['generations_open_min']}/{p['generations']} | {fmt(p['tokens_offered_per_second'])} "
            f"| {fmt(p['tokens_appended_per_second'])} | {fmt(p['added_latency_ms_p50'])} "
            f"| {fmt(p['added_latency_ms_p99'])} | {fmt(p['tokens_per_delta_event'], 2)} "
            f"| {fmt(p['script_calls_per_token'], 4)} "
            f"| {fmt(p['redis_commands_per_token_including_inside_scripts'], 2)} "
            f"| {fmt(p['worker_cpu_us_per_token'])} | {cores['worker']:.2f} | {cores['redis']:.2f} "
            f"| {cores['upstream']:.2f} | {fmt(p['other_processes_cores'], 2)} |"
        )

    head = (
        "| | held | offered tok/s | appended tok/s | p50 ms | p99 ms | tokens/event | script calls/token "
        "| commands/token (in scripts too) | worker CPU-µs/token | worker cores | Redis cores | upstream cores "
        "| other processes' cores |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for name in ("on", "off"):
        if name in r:
            lines.append(row(f"{name} (median of {len(r['pair_runs'][name])})", r[name]))
    if "on_vs_off" in r:
        lines.append("\non ÷ off: " + ", ".join(f"{k} {v}" for k, v in r["on_vs_off"].items()))
    for title, points in (("sweep", r.get("sweep", [])), ("flush windows", r.get("windows", []))):
        lines += ["", f"{title}:", "", head]
        lines += [row(f"{p['variant']} {p['generations']}", p) for p in points]
    for key in ("baseline", "current"):
        points = r.get("worker_versions", {}).get(key, [])
        if points:
            lines += ["", f"worker version: {key}:", "", head]
            lines += [row(f"{key} x{p.get('workers', 1)} {p['generations']}", p) for p in points]
    return "\n".join(lines)


async def metrics_pairs(
    args: argparse.Namespace, run: Callable[[Variant, int, str, str], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Part 'metrics': the default worker without and with a metrics port, `--runs` pairs at each count of
    `--metrics-at`, alternating which goes first; the ratio of worker CPU per token, per pair."""
    out: dict[str, Any] = {}
    for count in [int(c) for c in args.metrics_at.split(",") if c]:
        pairs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for r in range(args.runs):
            order = [("off", ON), ("on", ON_METRICS)]
            for key, variant in order if r % 2 == 0 else order[::-1]:
                pairs[key].append(await run(variant, count, f"metrics {key} {count} run {r}", f"m{r}"))
        ratios = [
            round(on["worker_cpu_us_per_token_offered"] / off["worker_cpu_us_per_token_offered"], 4)
            for on, off in zip(pairs["on"], pairs["off"], strict=True)
        ]
        out[str(count)] = {
            "off": headline(pairs["off"]),
            "on": headline(pairs["on"]),
            "cpu_per_token_on_vs_off_per_pair": ratios,
            "cpu_per_token_on_vs_off_median": median(ratios),
            "runs": pairs,
        }
        log(f"metrics at {count}: worker CPU per token on/off per pair {ratios}, median {median(ratios)}")
    return out


async def version_pairs(
    args: argparse.Namespace, run: Callable[[Variant, int, str, str], Awaitable[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Part 'versions': another version of the worker (``--baseline-worker``) beside this one, coalescing on,
    at each count of ``--versions-at`` with each number of ``--versions-workers``, ``--runs`` times,
    alternating which goes first."""
    versions: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    for count in [int(c) for c in args.versions_at.split(",") if c]:
        for r in range(args.runs):
            for workers in [int(w) for w in args.versions_workers.split(",") if w]:
                pairs = [
                    ("baseline", Variant("on", True, 5.0, args.baseline_worker, workers=workers)),
                    ("current", Variant("on", True, 5.0, workers=workers)),
                ]
                for key, variant in pairs if r % 2 == 0 else pairs[::-1]:  # drift hits both alike
                    label = f"{key} worker x{workers} {count} run {r}"
                    versions[key].append(await run(variant, count, label, f"v{r}w{workers}"))
    return versions


async def main() -> None:
    args = parse_args()
    n = args.generations
    log(f"logs and raw samples in {LOGS}")
    upstream_check = await validate_upstream()

    async def run(variant: Variant, count: int, label: str, tag: str) -> dict[str, Any]:
        point = Point(variant, count)
        result = await measure_point(point, args.rate, args.seconds, args.warmup, tag, args.quiet_wait)
        print_row(label, result)
        return result

    pair: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for r in range(args.runs if "pair" in args.parts else 0):
        for variant in [v for v in (ON, OFF) if v.name in args.variants]:  # interleaved: drift hits both
            pair[variant.name].append(await run(variant, n, f"{variant.name} {n} run {r}", f"p{r}"))
    counts = {
        variant.name: [int(c) for c in spec.split(",") if c] if "sweep" in args.parts else []
        for variant, spec in ((ON, args.sweep), (OFF, args.sweep_off))
    }
    on_sweep = dataclasses.replace(ON, workers=args.sweep_workers)
    sweep = [
        await run(variant, count, f"{variant.name} x{variant.workers} {count}", "s")
        for count in sorted(set(counts["on"]) | set(counts["off"]))
        for variant in (on_sweep, OFF)
        if count in counts[variant.name]
    ]
    windows = [
        await run(Variant(f"on-{ms:g}ms", True, ms), count, f"window {ms:g} ms {count}", "w")
        for count in [int(c) for c in args.windows_at.split(",") if c]
        for ms in ([float(w) for w in args.windows.split(",") if w] if "windows" in args.parts else [])
    ]
    versions = await version_pairs(args, run) if "versions" in args.parts else {"baseline": [], "current": []}
    metrics = await metrics_pairs(args, run) if "metrics" in args.parts else {}
    command = " ".join(["./dev bench worker", *sys.argv[1:]])
    result: dict[str, Any] = {
        "command": command,
        "generations": n,
        "rate_per_generation": args.rate,
        "target": {
            "generations": 500,
            "rate_per_generation": 50,
            "script_calls_per_token_below": 0.2,
            "added_latency_ms_p99_below": 20,
        },
    }
    result["upstream_check"] = upstream_check
    if pair["on"] and pair["off"]:
        result.update(summarize(args, pair))
    result.update(pair_runs=pair, sweep=sweep, windows=windows)
    if versions["current"]:
        result["worker_versions"] = {"baseline_worker": args.baseline_worker, **versions}
    result.update({"metrics_cost": metrics} if metrics else {})
    print(json.dumps({k: result[k] for k in ("on", "off", "on_vs_off", "verdict") if k in result}, indent=2))
    name = args.output or ("worker-quick" if args.quick else "worker")
    if args.merge and (RESULTS / f"{name}.json").exists():
        kept = json.loads((RESULTS / f"{name}.json").read_text())
        fresh = {k: v for k, v in result.items() if v not in ([], {"on": [], "off": []})}
        result = {**kept, **fresh, "command": kept.get("command", command) + " ; " + command}
    print("saved", save(name, result))
    shutil.rmtree(LOGS, ignore_errors=True)


if __name__ == "__main__" and "--report" in sys.argv:
    print(report(RESULTS / "worker.json"))
elif __name__ == "__main__":
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
