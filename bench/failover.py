"""A primary of the Redis Cluster killed with SIGKILL mid-generation: how long until tokens flow again.

    ./dev bench failover [--runs 5] [--sessions 30] [--rate 50] [--tokens 600] [--workers 1]
        [--node-timeout-ms 1000,2000,5000] [--fault kill|stop] [--victim session|seed] [--output failover]
    python -m bench.failover ...

Each run starts afresh: an embedded cluster of 3 primaries with one replica each
(`tokenfan.cli.embedded_cluster.EmbeddedCluster`, its ``cluster-node-timeout`` from ``--node-timeout-ms``; several
values are measured one after the other), the job queue on a Valkey of its own, and one API, ``--workers`` workers
and one relay (`bench.harness.Stack`). ``--sessions`` sessions get one generation each from the simulator at
``--rate`` tokens/s, and each session is watched by one WebSocket subscriber (`tokenfan.client.SessionStream`,
resuming and rebuilding as a user's would, default backoff) that records when every frame arrives. Once every session
streams, the primary owning the first session's slot (``--victim seed``: the first seed node of every process's
cluster client) is killed with SIGKILL (``--fault stop``: SIGSTOP, a primary that hangs); the sessions in its
slots are the *affected* ones.

Reported per run, every time counted from the kill: when a surviving primary first says ``cluster_state:fail``
and when it says ``ok`` again; when the killed primary's replica answers ``ROLE`` as a master (promoted); for each
affected session, when its first frame after the stall reaches its subscriber (p50 and max over the affected
sessions, and the last of them: every affected session flowing again); for the unaffected sessions, the longest
gap between two frames during the failover (and, for comparison, in the 2 s before the kill), and the longest gap
between two of their events as Redis appended them (the stream ids' times: a stall in the writes, not the
fan-out, shows there too); each
generation's outcome (its terminal event, and the error type of a failure); whether each subscriber's final text
equals ``GET /v1/generations/{id}``; rebuilds (snapshots) and reconnections; whether every process lived on.

The cluster only starts a failover once the primary has been unreachable for the node timeout, so that timeout
is the floor of every figure: each is also given minus it. Saved in ``bench/results/failover.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.harness import Backend, Stack, log, median, percentile, save
from tokenfan.cli.embedded_cluster import EmbeddedCluster, command
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.client import SessionStream, Transcript, TranscriptError
from tokenfan.store.slots import slot_of

__all__ = ["ClusterClock", "Watch", "main", "one_run", "summarize"]

#: A gap between two frames of one session longer than this is a stall (at 50 tokens/s frames come every
#: 20 ms; the worker's flush window and the machine's noise stay well below it).
STALL_SECONDS = 0.25
#: Deltas every session must have streamed before the kill's countdown (`--before`) starts.
LIVE_DELTAS = 25


@dataclass
class Watch:
    """One session's subscriber: every frame's arrival time (monotonic), and the transcript it assembled."""

    session_id: str
    affected: bool
    generation_id: str = ""
    arrivals: list[float] = field(default_factory=list)
    written: list[float] = field(default_factory=list)  # each delta's stream id: when Redis appended it
    transcript: Transcript = field(default_factory=Transcript)
    snapshots: int = 0
    error: str | None = None
    stream: SessionStream | None = None
    live: asyncio.Event = field(default_factory=asyncio.Event)  # set once it has streamed `LIVE_DELTAS`

    def status(self) -> tuple[str, str]:
        """(status, text) of the generation as this subscriber assembled it."""
        generation = self.transcript.generations.get(self.generation_id)
        if generation is None:
            return "unseen", ""
        return generation.status.value, generation.text

    async def follow(self, relay_url: str, api_url: str) -> None:
        self.stream = SessionStream(relay_url, self.session_id, api_url=api_url)
        try:
            async for frame in self.stream:
                if frame["type"] in ("delta", "snapshot"):
                    self.arrivals.append(time.monotonic())
                if frame["type"] == "delta":  # offset "<epoch>:<ms>-<seq>", ms by the server's clock
                    self.written.append(int(frame["offset"].split(":")[1].split("-")[0]) / 1000)
                self.snapshots += frame["type"] == "snapshot"
                self.transcript.apply(frame)
                if self.deltas() >= LIVE_DELTAS:
                    self.live.set()
                generation = self.transcript.generations.get(self.generation_id)
                if generation is not None and generation.status.is_terminal:
                    return
        except TranscriptError as exc:  # a gap or a duplicate: what the product must never show
            self.error = str(exc)

    def ended(self) -> bool:
        """Whether this subscriber saw its generation end."""
        generation = self.transcript.generations.get(self.generation_id)
        return generation is not None and generation.status.is_terminal

    def frames_until(self, end: float) -> list[float]:
        """Its arrivals, and `end` after them when it never saw its generation end: a stall that never
        closed counts as a gap up to `end`."""
        return self.arrivals if self.ended() else [*self.arrivals, end]

    def deltas(self) -> int:
        generation = self.transcript.generations.get(self.generation_id)
        return len(generation.content) if generation is not None else 0


@dataclass
class ClusterClock:
    """Watches the cluster from a thread, from just before the kill: when a surviving primary first says the
    cluster is down and then up again, and when the replica of the killed primary became a primary."""

    survivor: EmbeddedRedis
    replica: EmbeddedRedis
    host: str
    killed_at: float = 0.0
    killed_wall: float = 0.0  # the same instant on the wall clock, which stream ids count in
    down_at: float | None = None
    promoted_at: float | None = None
    ok_at: float | None = None
    ended_at: float = 0.0  # when the wait for the generations ended (all done, or `--timeout`)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set() and self.ok_at is None:
            with contextlib.suppress(OSError, RuntimeError):
                self._sample()
            time.sleep(0.005)

    def _sample(self) -> None:
        now = time.monotonic()
        if self.promoted_at is None:
            role = command(self.host, self.replica.port, "ROLE", timeout=1.0)
            if isinstance(role, list) and role and role[0] == "master":
                self.promoted_at = now
        info = str(command(self.host, self.survivor.port, "CLUSTER", "INFO", timeout=1.0))
        if "cluster_state:fail" in info and self.down_at is None:
            self.down_at = now
        elif "cluster_state:ok" in info and self.promoted_at is not None:
            self.ok_at = now


def cluster_backend(node_timeout_ms: int) -> Backend:
    """`Backend`'s cluster (3 primaries, a replica each, the queue on its own Valkey) with the given timeout."""
    backend = Backend("cluster", primaries=3, replicas=1)
    backend.cluster = EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=node_timeout_ms).start()
    backend.nodes = list(backend.cluster.primaries)
    backend.queue = EmbeddedRedis().start()
    return backend


def request(rate: float, tokens: int) -> dict[str, Any]:
    directive = json.dumps({"tokens": tokens, "rate": rate})
    return {"model": "tokenfan-sim", "messages": [{"role": "user", "content": f"go <<sim {directive}>>"}]}


async def start_generations(
    stack: Stack, cluster: EmbeddedCluster, args: argparse.Namespace
) -> tuple[list[Watch], list[asyncio.Task[None]], EmbeddedRedis]:
    """Subscribers first, then one generation per session; returns them and the primary to kill (the first
    session's, or with ``--victim seed`` the first seed of every process's cluster client)."""
    sessions = [f"failover-{uuid.uuid4().hex[:12]}" for _ in range(args.sessions)]
    victim = cluster.primaries[0] if args.victim == "seed" else cluster.primary_of_slot(slot_of(sessions[0]))
    owners = {session: cluster.primary_of_slot(slot_of(session)).port for session in sessions}
    watches = [Watch(session, owners[session] == victim.port) for session in sessions]
    tasks = [asyncio.create_task(w.follow(stack.url("relay"), stack.url("api"))) for w in watches]
    async with httpx.AsyncClient(base_url=stack.url("api"), timeout=30) as api:
        for watch in watches:
            posted = await api.post(
                f"/v1/sessions/{watch.session_id}/generations", json=request(args.rate, args.tokens)
            )
            posted.raise_for_status()
            watch.generation_id = posted.json()["generation_id"]
    return watches, tasks, victim


async def kill_and_wait(
    cluster: EmbeddedCluster,
    victim: EmbeddedRedis,
    tasks: list[asyncio.Task[None]],
    seconds: float,
    fault: str = "kill",
) -> ClusterClock:
    """SIGKILL `victim` (or with `fault` "stop", SIGSTOP it: a primary that hangs, its connections open and
    silent) while a `ClusterClock` watches; returns once every subscriber saw its generation end, or after
    `seconds` (the sessions that never resumed are counted as such). A stopped victim is killed at the end."""
    replica = cluster.replicas_of(victim)[0]
    survivor = next(node for node in cluster.primaries if node is not victim)
    clock = ClusterClock(survivor, replica, cluster.host)
    watcher = asyncio.create_task(asyncio.to_thread(clock.run))
    clock.killed_at, clock.killed_wall = time.monotonic(), time.time()
    if fault == "stop":
        victim.pause()
    else:
        victim.kill()
    try:
        async with asyncio.timeout(seconds):
            await asyncio.gather(*tasks)
    except TimeoutError:
        log(f"not every generation ended within {seconds:.0f} s of the fault")
    finally:
        clock.ended_at = time.monotonic()
        clock.stop.set()
        await watcher
        for task in tasks:
            task.cancel()
        victim.kill()  # a stopped one still holds its port; a killed one: nothing to do
    return clock


def resumed_after(arrivals: list[float], killed_at: float) -> float | None:
    """When the first frame after the stall arrived: the end of the first gap longer than `STALL_SECONDS`
    ending after the kill (or the first arrival after the kill, when the session did not stall)."""
    later = [(i, at) for i, at in enumerate(arrivals) if at > killed_at]
    for i, at in later:
        if i > 0 and at - arrivals[i - 1] > STALL_SECONDS:
            return at
    return later[0][1] if later else None


def longest_gap(arrivals: list[float], start: float, end: float) -> float:
    """The longest time between two consecutive frames, over the gaps that overlap [start, end]."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals) if b > start and a < end]
    return max(gaps, default=0.0)


def before_kill(watches: list[Watch], killed_at: float) -> float:
    """The longest gap between two frames of `watches` in the 2 s before the kill: the noise floor."""
    gaps = [
        longest_gap([at for at in w.arrivals if at <= killed_at], killed_at - 2, killed_at) for w in watches
    ]
    return round(max(gaps, default=0.0), 3)


async def outcomes(api_url: str, watches: list[Watch]) -> dict[str, Any]:
    """Each generation's terminal status (with the error type of a failure), and whether its subscriber's
    final text is what the API reports."""
    counts: dict[str, int] = {}
    equal = 0
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as api:
        for watch in watches:
            final = (await api.get(f"/v1/generations/{watch.generation_id}")).json()
            outcome = final["status"]
            if final.get("error"):
                outcome += f" ({final['error'].get('type')})"
            counts[outcome] = counts.get(outcome, 0) + 1
            status, text = watch.status()
            equal += (status, text) == (final["status"], final.get("text"))
    return {"outcomes": counts, "subscriber_text_equals_api": equal}


def figures(watches: list[Watch], clock: ClusterClock) -> dict[str, Any]:
    """Every figure of one run, in seconds from the kill."""
    killed_at = clock.killed_at
    affected = [w for w in watches if w.affected]
    others = [w for w in watches if not w.affected]
    resumed = [resumed_after(w.arrivals, killed_at) for w in affected]
    back = [at - killed_at for at in resumed if at is not None]
    # Until the last affected session flowed again; until the end of the wait, if one never did.
    all_back = killed_at + max(back, default=0.0) if len(back) == len(resumed) else clock.ended_at

    def since_kill(at: float | None) -> float | None:
        return round(at - killed_at, 3) if at is not None else None

    return {
        "sessions": len(watches),
        "affected_sessions": len(affected),
        "cluster_down_s": since_kill(clock.down_at),
        "replica_promoted_s": since_kill(clock.promoted_at),
        "cluster_ok_s": since_kill(clock.ok_at),
        "affected_first_frame_s_p50": round(percentile(back, 50), 3),
        "affected_first_frame_s_max": round(max(back, default=float("nan")), 3),
        "affected_first_frame_after_promotion_s_p50": (
            round(percentile(back, 50) - (clock.promoted_at - killed_at), 3) if clock.promoted_at else None
        ),
        "affected_never_resumed": len(resumed) - len(back),
        "unaffected_longest_gap_s": round(
            max(
                (longest_gap(w.frames_until(clock.ended_at), killed_at, all_back + 0.5) for w in others),
                default=0.0,
            ),
            3,
        ),
        "unaffected_never_ended": sum(not w.ended() for w in others),
        "unaffected_longest_write_gap_s": round(
            max(
                (
                    longest_gap(w.written, clock.killed_wall, clock.killed_wall + all_back - killed_at + 0.5)
                    for w in others
                ),
                default=0.0,
            ),
            3,
        ),
        "unaffected_longest_gap_before_kill_s": before_kill(others, killed_at),
        "affected_longest_gap_before_kill_s": before_kill(affected, killed_at),
        "snapshots": sum(w.snapshots for w in watches),
        "reconnections": sum(max(0, (w.stream.connections if w.stream else 0) - 1) for w in watches),
        "transcript_errors": [w.error for w in watches if w.error],
    }


async def one_run(args: argparse.Namespace, tag: str) -> dict[str, Any]:
    backend = cluster_backend(args.node_timeout)
    assert backend.cluster is not None
    stack = Stack(env_overrides=backend.env(), workers=args.workers)
    try:
        stack.start()
        watches, tasks, victim = await start_generations(stack, backend.cluster, args)
        async with asyncio.timeout(20):
            await asyncio.gather(*(w.live.wait() for w in watches))
        await asyncio.sleep(args.before)
        running = [child for child in stack.children.values() if child.alive()]
        clock = await kill_and_wait(backend.cluster, victim, tasks, args.timeout, args.fault)
        result = figures(watches, clock)
        result.update(await outcomes(stack.url("api"), watches))
        result["processes_alive"] = all(child.alive() for child in running)
    finally:
        stack.stop()
        backend.close()
    log(f"run {tag}: {json.dumps(result)}")
    return result


def summarize(runs: list[dict[str, Any]], node_timeout_s: float) -> dict[str, Any]:
    """Medians and maxima over runs, and the same minus the node timeout (the floor of every one)."""
    summary: dict[str, Any] = {}
    for key in (
        "cluster_down_s",
        "replica_promoted_s",
        "cluster_ok_s",
        "affected_first_frame_s_p50",
        "affected_first_frame_s_max",
        "affected_first_frame_after_promotion_s_p50",
        "unaffected_longest_gap_s",
        "unaffected_longest_write_gap_s",
    ):
        values = [run[key] for run in runs if run[key] is not None]
        summary[key] = {
            "median": round(median(values), 3),
            "max": round(max(values, default=float("nan")), 3),
        }
        if "promotion" not in key:  # every other figure counts from the kill
            summary[key]["median_minus_node_timeout"] = round(median(values) - node_timeout_s, 3)
    summary["unaffected_longest_gap_before_kill_s_max"] = max(
        run["unaffected_longest_gap_before_kill_s"] for run in runs
    )
    totals: dict[str, int] = {}
    for run in runs:
        for outcome, n in run["outcomes"].items():
            totals[outcome] = totals.get(outcome, 0) + n
    summary["outcomes"] = totals
    summary["subscriber_text_equals_api"] = f"{sum(r['subscriber_text_equals_api'] for r in runs)}/" + str(
        sum(r["sessions"] for r in runs)
    )
    summary["affected_sessions"] = sum(run["affected_sessions"] for run in runs)
    summary["processes_alive_every_run"] = all(run["processes_alive"] for run in runs)
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s of each generation")
    parser.add_argument("--tokens", type=int, default=600, help="tokens of each generation")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--node-timeout-ms",
        default="1000",
        help="the cluster's cluster-node-timeout; several, comma-separated, are measured one after the other",
    )
    parser.add_argument("--before", type=float, default=2.0, help="seconds of streaming before the kill")
    parser.add_argument("--timeout", type=float, default=40.0, help="longest wait for the generations to end")
    parser.add_argument(
        "--fault",
        choices=["kill", "stop"],
        default="kill",
        help="SIGKILL the primary, or SIGSTOP it (it hangs: connections open and silent)",
    )
    parser.add_argument(
        "--victim",
        choices=["session", "seed"],
        default="session",
        help="the primary of the first session's slot (any of them, by chance), or the first seed node: the "
        "one every process asks first for the slot map",
    )
    parser.add_argument("--output", default="failover", help="results name (bench/results/NAME.json)")
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    by_timeout: dict[str, Any] = {}
    for node_timeout_ms in [int(ms) for ms in args.node_timeout_ms.split(",") if ms]:
        args.node_timeout = node_timeout_ms
        runs = [await one_run(args, f"{node_timeout_ms} ms #{n}") for n in range(args.runs)]
        by_timeout[str(node_timeout_ms)] = {"summary": summarize(runs, node_timeout_ms / 1000), "runs": runs}
        print(node_timeout_ms, "ms:", json.dumps(by_timeout[str(node_timeout_ms)]["summary"], indent=2))
    result = {
        "command": " ".join(["./dev bench failover", *sys.argv[1:]]),
        "settings": vars(args),
        "stall_seconds": STALL_SECONDS,
        "by_cluster_node_timeout_ms": by_timeout,
    }
    print("saved", save(args.output, result))


if __name__ == "__main__":
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
