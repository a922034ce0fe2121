"""Shared benchmark plumbing: real processes on loopback, CPU accounting from /proc, percentiles."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from tokenfan.cli.embedded_cluster import EmbeddedCluster
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.cli.processes import ChildProcess
from tokenfan.store import Store
from tokenfan.store.connection import Client, cluster_client, redis_client

RESULTS = Path(__file__).parent / "results"
_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine so far, all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine (and interrupt handling) has used so far, all cores."""
    return machine_jiffies()[0] / _TICKS


async def wait_until_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most `max_wait` s) until the machine's other work uses under `threshold` cores, sampled over
    1 s: the cores are shared with whatever else runs here. Returns the busy cores of the last sample."""
    deadline = time.monotonic() + max_wait
    cores = os.cpu_count() or 1
    while True:
        before = machine_jiffies()
        await asyncio.sleep(1.0)
        after = machine_jiffies()
        busy = (after[0] - before[0]) / max(1, after[1] - before[1]) * cores
        if busy < threshold or time.monotonic() > deadline:
            if busy >= threshold:
                log(f"machine still busy ({busy:.2f} cores in use by other processes); measuring anyway")
            return busy
        log(f"waiting for the machine to quieten ({busy:.2f} cores busy)")


async def command_calls(redis: Redis) -> dict[str, int]:
    """Calls per Redis command so far (``INFO commandstats``)."""
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Backend:
    """Where a benchmark's sessions live: one embedded Valkey (``single``), or an embedded cluster of
    `primaries` primaries with `replicas` replicas each (``cluster``), whose job queue is a plain Valkey of its
    own. With `separate_queue`, one Redis gets its queue on a plain Valkey of its own too, so that the data
    nodes' counters hold the store's commands alone in both kinds."""

    kind: str = "single"
    primaries: int = 3
    replicas: int = 0
    separate_queue: bool = False
    nodes: list[EmbeddedRedis] = field(default_factory=list)
    queue: EmbeddedRedis | None = None
    cluster: EmbeddedCluster | None = None

    def start(self) -> Backend:
        if self.kind == "cluster":
            self.cluster = EmbeddedCluster(primaries=self.primaries, replicas=self.replicas).start()
            self.nodes = list(self.cluster.primaries)
        else:
            self.nodes = [EmbeddedRedis().start()]
        if self.kind == "cluster" or self.separate_queue:
            self.queue = EmbeddedRedis().start()
        return self

    @property
    def is_cluster(self) -> bool:
        return self.kind == "cluster"

    @property
    def url(self) -> str:
        """``REDIS_URL``: the one node, or every primary of the cluster (seeds)."""
        return self.cluster.url if self.cluster is not None else self.nodes[0].url

    @property
    def queue_url(self) -> str:
        return self.queue.url if self.queue is not None else self.url

    def env(self) -> dict[str, str]:
        """The settings every process of the system needs to use this backend."""
        env = {"REDIS_URL": self.url}
        if self.is_cluster:
            env["TOKENFAN_REDIS_CLUSTER"] = "true"
        if self.queue is not None:
            env["TOKENFAN_QUEUE_REDIS_URL"] = self.queue.url
        return env

    def node_names(self) -> list[str]:
        return [f"{node.host}:{node.port}" for node in self.nodes]

    def node_pids(self) -> dict[str, int]:
        """The data nodes (primaries; replicas and the queue excluded), by ``host:port``."""
        return {
            f"{node.host}:{node.port}": node.process.pid for node in self.nodes if node.process is not None
        }

    def cpu_seconds(self) -> float:
        """CPU seconds the data nodes have used so far, all together."""
        return sum(cpu_seconds(pid) for pid in self.node_pids().values())

    def client(self, client_name: str | None = None) -> Client:
        """A client of the store's kind for this backend (close it with ``aclose()``); `client_name` names
        its connections on every node (``CLIENT LIST``)."""
        if self.is_cluster:
            return cluster_client(self.url, client_name=client_name)
        return redis_client(self.url, client_name=client_name)

    def store(self, client_name: str | None = None) -> Store:
        """A store on a new client (close it with ``close()``)."""
        return Store(self.client(client_name), session_ttl_seconds=3600, stream_max_length=100_000)

    async def command_calls(self) -> dict[str, dict[str, int]]:
        """``INFO commandstats`` calls of every data node, by node."""
        calls: dict[str, dict[str, int]] = {}
        for node in self.nodes:
            redis = Redis(host=node.host, port=node.port)
            try:
                calls[f"{node.host}:{node.port}"] = await command_calls(redis)
            finally:
                await redis.aclose()
        return calls

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        else:
            for node in self.nodes:
                node.close()
        if self.queue is not None:
            self.queue.close()


def calls_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Per node, the commands called between two `Backend.command_calls` (the benchmark's INFO left out)."""
    delta: dict[str, dict[str, int]] = {}
    for node, calls in after.items():
        was = before.get(node, {})
        changed = {name: n - was.get(name, 0) for name, n in calls.items() if name != "info"}
        delta[node] = {name: n for name, n in sorted(changed.items()) if n}
    return delta


def summed(per_node: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per-node command counts added up over the nodes."""
    total: dict[str, int] = {}
    for calls in per_node.values():
        for name, n in calls.items():
            total[name] = total.get(name, 0) + n
    return dict(sorted(total.items()))


@dataclass
class Stack:
    """Embedded Valkey + simulator + relay + API + workers, each its own process."""

    env_overrides: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    simulator_rate: float = 0.0
    redis: EmbeddedRedis | None = None
    children: dict[str, ChildProcess] = field(default_factory=dict)

    def start(self) -> Stack:
        self.redis = EmbeddedRedis().start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENFAN_", "OPENAI_"))}
        env.update(REDIS_URL=self.redis.url, TOKENFAN_LOG_LEVEL="warning", TOKENFAN_LOG_FORMAT="json")
        env["TOKENFAN_INSECURE_DEV_MODE"] = (
            "true"  # measure the data path; authentication happens once per connection
        )
        # A benchmark enqueues a burst of generations per run, far past one API key's default budget.
        env["TOKENFAN_RATE_LIMIT_PER_MINUTE"] = "0"
        env.update(self.env_overrides)
        simulator = self._spawn(
            "simulator", ["--port", "0", "--tokens-per-second", str(self.simulator_rate)], env
        )
        env["OPENAI_BASE_URL"] = simulator.wait_ready() + "/v1"
        self._spawn("relay", ["--port", "0"], env).wait_ready()
        self._spawn("api", ["--port", "0"], env).wait_ready()
        for n in range(self.workers):
            self._spawn("worker", [], env, name=f"worker-{n}").wait_ready()
        return self

    def _spawn(
        self, role: str, args: list[str], env: dict[str, str], name: str | None = None
    ) -> ChildProcess:
        child = ChildProcess(role, args, env=env, name=name or role).start()
        self.children[name or role] = child
        return child

    def url(self, name: str) -> str:
        return self.children[name].url

    def cpu(self) -> dict[str, float]:
        usage = {name: cpu_seconds(child.pid) for name, child in self.children.items()}
        if self.redis is not None and self.redis.process is not None:
            usage["redis"] = cpu_seconds(self.redis.process.pid)
        return usage

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()
        if self.redis is not None:
            self.redis.close()


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack.start()
    finally:
        stack.stop()


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in after}


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
