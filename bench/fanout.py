"""Fan-out through one relay: deliveries, latency and cost per frame, beside raw broadcast and a naive relay.

    ./dev bench fanout [--runs 3] [--seconds 5] [--clients 3] [--quick]
    python -m bench.fanout ...

One relay process (`tokenfan relay`) against an embedded Valkey. A producer in this process appends deltas to
session streams through the real write path (`Store.write`, a started generation) at a fixed token rate; each
delta's content starts with its append time, so subscribers measure latency from append to receipt. The
subscribers are lean WebSocket clients (`bench.fanout_client`) spread over ``--clients`` processes.

In the same run, two references with the same subscribers and frame sizes:
* raw broadcast (`bench.raw_broadcast`): `websockets.broadcast` of pre-encoded frames, no Redis: what one
  core can push through `websockets`;
* a naive relay (`bench.naive_relay`): one ``XREAD BLOCK`` loop per subscriber.

Reported per scenario (medians of ``--runs``): token deliveries/s, frames/s, latency p50/p99, relay CPU-µs
per delivered frame and raw broadcast's, relay RSS, Redis commands per frame, each process's CPU; the
highest sustained token deliveries/s of the relay and of the naive relay; catch-up times (part ``catchup``:
one resume and 100 at the same instant, each subscriber timed from its own connection attempt); a storm of
1,000 reconnects to a freshly started relay during a live generation (part ``reconnect``); and the
1,000-subscriber tail (part ``tail``). With ``--baseline-code DIR`` those three parts run a relay from DIR
too ("before"), in the same run; in part ``tail`` each relay is fed by its own code's store, in a producer
process of its own (`bench.fanout_producer`), so that code from before a change to the write script can be
measured. Every process
shares the machine's cores, so each figure comes with the CPU each process used.
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
import multiprocessing
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from redis.asyncio import Redis

from bench.fanout_client import ClientConfig, LatencyHistogram, run_client, token_content
from bench.harness import (
    Backend,
    calls_delta,
    command_calls,
    log,
    machine_busy_seconds,
    median,
    rss_bytes,
    save,
    summed,
    wait_until_quiet,
)
from tokenfan.cli.processes import ChildProcess
from tokenfan.contract.events import EventType, encode_body, event_body
from tokenfan.contract.ids import new_generation_id
from tokenfan.store import EventWrite, StartOutcome, WriteItem
from tokenfan.store.slots import slot_of

ROOT = Path(__file__).resolve().parent.parent
LOGS = Path(tempfile.mkdtemp(prefix="tokenfan-fanout-"))
#: A run counts as sustained (it keeps up) when subscribers received this share of the tokens appended in
#: the window …
SUSTAINED_SHARE = 0.97
#: … their latency did not grow by more than this over the window (ms per second) …
SUSTAINED_LAG_GROWTH_MS_PER_S = 50.0
#: … p99 latency stayed below this (ms), and no subscriber was sent a slow-consumer snapshot.
SUSTAINED_P99_MS = 1000.0


_TICKS = os.sysconf("SC_CLK_TCK")


def run_time_ns(pid: int) -> int:
    """The CPU time every thread of a process has used so far, in nanoseconds (the scheduler's own count:
    `cpu_times` ticks at 10 ms, too coarse for one storm of a few tens of milliseconds)."""
    return sum(
        int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()
    )


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


# --- processes


def child_env(redis: dict[str, str]) -> dict[str, str]:
    """The environment of a child process; `redis` is `Backend.env()`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENFAN_", "OPENAI_"))}
    env.update(
        **redis,
        TOKENFAN_LOG_LEVEL="warning",
        TOKENFAN_LOG_FORMAT="json",
        # Measure the data path: authentication happens once per connection (as in bench/harness.py).
        TOKENFAN_INSECURE_DEV_MODE="true",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


class BenchServer:
    """A server of ours as a child process (the relay, or a bench module), ready when it writes its URL."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.name = name
        self.cwd = cwd
        self.ready_file = LOGS / f"{name}.ready"
        self.command = [*command, "--ready-file", str(self.ready_file)]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.ready: dict[str, Any] = {}

    def start(self, timeout: float = 30.0) -> BenchServer:
        self.ready_file.unlink(missing_ok=True)
        with (LOGS / f"{self.name}.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; see {LOGS / (self.name + '.log')}")
            time.sleep(0.02)
        self.ready = json.loads(self.ready_file.read_text())
        self.url = str(self.ready["url"])
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def http(self) -> str:
        return self.url.replace("ws://", "http://", 1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


#: Where the relay's code is imported from (``--relay-code``): this checkout, or another copy of it.
RELAY_CODE = ROOT


def relay_server(
    redis: Backend, name: str = "relay", *, metrics: bool = False, code: Path | None = None
) -> BenchServer:
    """A relay process running the code in `code` (default: `RELAY_CODE`)."""
    code = code or RELAY_CODE
    child = ChildProcess("relay", ["--port", "0"])  # only for its command line: python -m tokenfan relay
    command = [sys.executable, "-m", "tokenfan", child.role, *child.args]
    env = child_env(redis.env())
    if metrics:
        env["TOKENFAN_METRICS_PORT"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(code), env["PYTHONPATH"]])
    return BenchServer(name, command, env, cwd=code)


def module_server(module: str, args: list[str], redis: Backend) -> BenchServer:
    return BenchServer(
        module.rsplit(".", 1)[-1], [sys.executable, "-m", module, *args], child_env(redis.env())
    )


class LoadGenerator:
    """Subscriber processes (`bench.fanout_client`), kept for the whole benchmark, connected per run."""

    def __init__(self, processes: int, max_seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=run_client, args=(child, max_seconds), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    async def _ask(self, pipe: Connection, command: tuple[Any, ...], wait: float) -> Any:
        pipe.send(command)

        def receive() -> Any:
            if not pipe.poll(wait):
                raise TimeoutError(f"load generator did not answer {command[0]!r} within {wait}s")
            return pipe.recv()

        return await asyncio.to_thread(receive)

    def _config(self, host: str, port: int, paths: list[str], n: int) -> ClientConfig:
        # Process n connects from 127.<10+n>.x.y, with handshakes in flight shared out under the backlog.
        return ClientConfig(host, port, paths, 10 + n, connect_concurrency=max(8, 90 // len(self.pipes)))

    def _split(self, paths: list[str]) -> list[list[str]]:
        return [paths[i :: len(self.pipes)] for i in range(len(self.pipes))]

    async def connect(self, url: str, paths: list[str]) -> int:
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        replies = await asyncio.gather(
            *(
                self._ask(pipe, ("connect", self._config(parts.hostname, parts.port, share, n)), 120)
                for n, (pipe, share) in enumerate(zip(self.pipes, self._split(paths), strict=True))
            )
        )
        failed = sum(reply[2] for reply in replies)
        errors = [reply[3] for reply in replies if reply[3]]
        if errors:
            log(f"  {failed} of {len(paths)} connections failed; failed attempts per process: {errors}")
        if failed == len(paths):
            raise RuntimeError(f"no subscriber could connect to {url}")
        return sum(reply[1] for reply in replies)

    def window(self, start_ns: int, end_ns: int) -> None:
        for pipe in self.pipes:
            pipe.send(("window", start_ns, end_ns))

    async def report(self) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(self._ask(pipe, ("report",), 60) for pipe in self.pipes))
        return [reply[1] for reply in replies]

    async def disconnect(self) -> None:
        await asyncio.gather(*(self._ask(pipe, ("disconnect",), 60) for pipe in self.pipes))

    async def catch_up(
        self, url: str, paths: list[str], tokens: int, seconds: float, hold: float = 0.0
    ) -> list[dict[str, Any]]:
        """Every path at the same instant, as a storm of reconnecting clients does: no handshake waits for
        another (the relay's accept queue takes them, or drops SYNs as it would for real clients)."""
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        shares = [share for share in self._split(paths) if share]
        configs = [self._config(parts.hostname, parts.port, share, n) for n, share in enumerate(shares)]
        for config in configs:
            config.connect_concurrency = len(config.paths)
        replies = await asyncio.gather(
            *(
                self._ask(pipe, ("catchup", config, tokens, seconds, hold), seconds + hold + 100)
                for pipe, config in zip(self.pipes, configs, strict=False)
            )
        )
        return [reply[1] for reply in replies]

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


# --- the producer


@dataclass
class Stream:
    session_id: str
    generation_id: str
    attempt: int
    seq: int = 0
    prefix: str = ""

    def body(self, seq: int, content: str) -> str:
        return f'{self.prefix}{seq},"content":"{content}"}}'


class Producer:
    """Appends deltas through `Store.write` at a fixed token rate per session; records what it appended."""

    def __init__(self, redis: Backend) -> None:
        self.store = redis.store(client_name="bench-producer")
        self.cluster = redis.is_cluster
        self.write_calls = 0

    async def open(self, session_ids: list[str]) -> list[Stream]:
        async def one(session_id: str) -> Stream:
            generation_id = new_generation_id()
            await self.store.accept(session_id, generation_id, request={"bench": True}, model="bench")
            start = await self.store.start(session_id, generation_id)
            assert start.outcome is StartOutcome.STARTED, start
            stream = Stream(session_id, generation_id, start.attempt)
            sample = encode_body(
                event_body(
                    EventType.DELTA, session_id=session_id, generation_id=generation_id, seq=7, content="c"
                )
            )
            stream.prefix = sample[: sample.index('"seq":') + 6]
            assert stream.body(7, "c") == sample  # the very bytes the worker would write
            return stream

        streams: list[Stream] = []
        for at in range(0, len(session_ids), 100):
            streams += await asyncio.gather(*(one(s) for s in session_ids[at : at + 100]))
        return streams

    async def write(self, streams: list[Stream], counts: list[int]) -> int:
        """Append counts[i] deltas to streams[i], all in one WRITE call; returns the append time (ns)."""
        now = time.time_ns()
        content = token_content(now)
        items = []
        for stream, count in zip(streams, counts, strict=True):
            events = []
            for _ in range(count):
                stream.seq += 1
                events.append(EventWrite(stream.seq, stream.body(stream.seq, content), content))
            items.append(WriteItem(stream.session_id, stream.generation_id, stream.attempt, events))
        await self.store.write(items)
        # Script calls: one per write on one Redis, one per slot written on a cluster.
        self.write_calls += len({slot_of(item.session_id) for item in items}) if self.cluster else 1
        return now

    async def run(self, streams: list[Stream], rate: float, start_ns: int, window: tuple[int, int]) -> int:
        """Append `rate` tokens/s to each stream from `start_ns` until the window ends, deltas spread evenly
        over time (round robin over streams); returns how many were appended inside the window."""
        total_rate = rate * len(streams)
        cursor = appended = in_window = 0
        await asyncio.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
        while True:
            now = time.time_ns()
            if now >= window[1]:
                return in_window
            due = int((now - start_ns) / 1e9 * total_rate) - appended
            if due <= 0:
                await asyncio.sleep(max(0.0005, (appended + 1) / total_rate - (now - start_ns) / 1e9))
                continue
            counts: dict[int, int] = {}
            for k in range(due):
                index = (cursor + k) % len(streams)
                counts[index] = counts.get(index, 0) + 1
            cursor = (cursor + due) % len(streams)
            sent_at = await self.write([streams[i] for i in counts], list(counts.values()))
            appended += due
            if window[0] <= sent_at < window[1]:
                in_window += due

    async def backlog(self, stream: Stream, events: int, batch: int = 250) -> str:
        """Append `events` deltas at full speed; returns the offset before them (a resume point)."""
        first = await self.store.write([WriteItem(stream.session_id, stream.generation_id, stream.attempt)])
        offset = first[0].last_offset
        if offset is None:
            await self.write([stream], [1])
            offset = (
                await self.store.write([WriteItem(stream.session_id, stream.generation_id, stream.attempt)])
            )[0].last_offset
        assert offset is not None
        for done in range(0, events, batch):
            await self.write([stream], [min(batch, events - done)])
        return str(offset)

    async def live(self, stream: Stream, rate: float, offsets: list[tuple[int, str]]) -> None:
        """Append one delta at a time at `rate` tokens/s, as a model streams, until cancelled; records each
        delta's append time and offset in `offsets`."""
        started = time.monotonic()
        while True:
            stream.seq += 1
            now = time.time_ns()
            content = token_content(now)
            event = EventWrite(stream.seq, stream.body(stream.seq, content), content)
            (written,) = await self.store.write(
                [WriteItem(stream.session_id, stream.generation_id, stream.attempt, [event])]
            )
            assert written.last_offset is not None
            offsets.append((now, str(written.last_offset)))
            await asyncio.sleep(max(0.0, started + len(offsets) / rate - time.monotonic()))

    async def close(self) -> None:
        await self.store.close()


class CodeProducer:
    """The producer's open and run in a process of its own (`bench.fanout_producer`), writing through the
    store of another copy of the code: a relay hears only what its own code's write script publishes."""

    def __init__(self, redis: Backend, code: Path) -> None:
        self.redis = redis
        self.code = code
        self.process: asyncio.subprocess.Process | None = None
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.asked = 0
        self.reading: asyncio.Task[None] | None = None

    async def start(self) -> CodeProducer:
        env = child_env(self.redis.env())
        env["PYTHONPATH"] = str(self.code)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bench" / "fanout_producer.py"), "--code", str(self.code),
            "--redis-url", self.redis.url, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=self.code,
        )  # fmt: skip
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answers[0] = ready
        self.reading = asyncio.create_task(self._read())
        await asyncio.wait_for(ready, 30)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            answer = json.loads(line)
            future = self.answers.pop(answer["id"], None)
            if future is not None and not future.done():
                future.set_result(answer)
        for future in self.answers.values():
            if not future.done():
                future.set_exception(RuntimeError(f"the producer of {self.code} exited"))

    async def _ask(self, **request: Any) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdin is not None
        self.asked += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answers[self.asked] = future
        self.process.stdin.write((json.dumps({"id": self.asked, **request}) + "\n").encode())
        await self.process.stdin.drain()
        return await future

    async def open(self, session_ids: list[str]) -> str:
        await self._ask(op="open", sessions=session_ids)
        return session_ids[0]

    async def run(self, key: str, rate: float, start_ns: int, window: tuple[int, int]) -> int:
        answer = await self._ask(op="run", key=key, rate=rate, start_ns=start_ns, window=list(window))
        return int(answer["in_window"])

    async def calls(self) -> int:
        return int((await self._ask(op="calls"))["write_calls"])

    async def close(self) -> None:
        if self.process is None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        if self.reading is not None:
            await self.reading


# --- measuring one run


@dataclass
class Target:
    """What the subscribers connect to, and how to read its counters."""

    kind: str  # relay | raw | naive
    server: BenchServer
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=30))

    async def stats(self) -> dict[str, Any]:
        if self.kind == "naive":
            return {}
        response = await self.http.get(f"{self.server.http}/stats")
        return dict(response.json())

    async def wait_for(self, key: str, value: int, seconds: float = 60.0) -> None:
        if self.kind == "naive":
            await asyncio.sleep(0.5)
            return
        deadline = time.monotonic() + seconds
        while (await self.stats()).get(key) != value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind}: {key} never reached {value}: {await self.stats()}")
            await asyncio.sleep(0.1)


@dataclass
class Bench:
    redis: Backend
    producer: Producer
    load: LoadGenerator
    seconds: float
    warmup: float
    runs: int
    raw_target: Target | None = None  # the references (`bench.raw_broadcast`, `bench.naive_relay`)
    naive_target: Target | None = None
    tag: int = 0
    controls: list[Redis] = field(default_factory=list)
    #: When set, `produce` writes through this producer (another copy of the code's store) instead.
    feeder: CodeProducer | None = None

    def __post_init__(self) -> None:
        self.controls = [
            Redis(host=node.host, port=node.port, client_name="bench-control") for node in self.redis.nodes
        ]

    async def close(self) -> None:
        for control in self.controls:
            await control.aclose()

    @property
    def raw(self) -> Target:
        assert self.raw_target is not None, "started without the raw broadcast reference"
        return self.raw_target

    @property
    def naive(self) -> Target:
        assert self.naive_target is not None, "started without the naive relay reference"
        return self.naive_target

    def session_ids(self, count: int) -> list[str]:
        self.tag += 1
        return [f"fan-{self.tag}-{n}" for n in range(count)]

    async def redis_counters(self) -> dict[str, Any]:
        """Commands called (every data node together, and by node) and, per connection of the server being
        measured (not named ``bench-*``), its commands and bytes sent to it."""
        by_node: dict[str, dict[str, int]] = {}
        clients: dict[str, tuple[int, int]] = {}
        for node, control in zip(self.redis.node_names(), self.controls, strict=True):
            by_node[node] = await command_calls(control)
            for client in await control.client_list():
                if not client.get("name", "").startswith("bench-"):  # the relay's, or the naive relay's
                    cmds, out = int(client.get("tot-cmds", 0)), int(client.get("tot-net-out", 0))
                    clients[f"{node}/{client['id']}"] = (cmds, out)
        return {"calls": summed(by_node), "calls_by_node": by_node, "clients": clients}

    def cpu(self, target: Target) -> dict[str, tuple[float, float]]:
        usage = {
            target.kind: cpu_times(target.server.pid),
            "redis": self.redis_cpu_times(),
            "producer": cpu_times(self.feeder.pid if self.feeder is not None else os.getpid()),
        }
        for n, pid in enumerate(self.load.pids):
            usage[f"loadgen-{n}"] = cpu_times(pid)
        return usage

    def redis_cpu_times(self) -> tuple[float, float]:
        """User and system CPU seconds of every data node together."""
        times = [cpu_times(pid) for pid in self.redis.node_pids().values()]
        return sum(user for user, _ in times), sum(system for _, system in times)

    async def sample(self, target: Target) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "at": time.time_ns(),
            "cpu": self.cpu(target),
            "machine": machine_busy_seconds(),
            "write_calls": await self.feeder.calls() if self.feeder else self.producer.write_calls,
        }
        sample["stats"] = await target.stats()
        sample["redis"] = await self.redis_counters()
        return sample

    async def run(
        self,
        target: Target,
        sessions: int,
        per_session: int,
        drive: Callable[[list[str], int, tuple[int, int]], Awaitable[int]],
    ) -> dict[str, Any]:
        """Connect per_session subscribers to each of `sessions` sessions, drive traffic, measure a window."""
        session_ids = self.session_ids(sessions)
        paths = [f"/v1/sessions/{sid}/stream" for sid in session_ids for _ in range(per_session)]
        subscribers = len(paths)
        rss_idle = rss_bytes(target.server.pid)
        setup = drive(session_ids, 0, (0, 0))  # prepares sessions (the producer's accept + start), no traffic
        await setup
        connected = await self.load.connect(target.server.url, paths)
        await target.wait_for("subscribers" if target.kind == "relay" else "connections", connected)
        rss_connected = rss_bytes(target.server.pid)
        await wait_until_quiet(10.0)
        start_ns = time.time_ns() + 200_000_000
        window = (start_ns + int(self.warmup * 1e9), start_ns + int((self.warmup + self.seconds) * 1e9))
        self.load.window(*window)

        async def sampled() -> tuple[dict[str, Any], dict[str, Any]]:
            await asyncio.sleep(max(0.0, (window[0] - time.time_ns()) / 1e9))
            before = await self.sample(target)
            await asyncio.sleep(max(0.0, (window[1] - time.time_ns()) / 1e9))
            return before, await self.sample(target)

        sampler = asyncio.create_task(sampled())
        appended = await drive(session_ids, start_ns, window)
        before, after = await sampler
        rss_end = rss_bytes(target.server.pid)
        await asyncio.sleep(1.0)  # let in-flight frames land before the counters are read
        reports = await self.load.report()
        await self.load.disconnect()
        await target.wait_for("connections", 0)
        return summarize(
            target.kind,
            subscribers=subscribers,
            connected=connected,
            sessions=sessions,
            appended=appended,
            per_session=per_session,
            before=before,
            after=after,
            reports=reports,
            rss=(rss_idle, rss_connected, rss_end),
        )

    # --- drivers

    def produce(self, rate: float, streams_out: list[int] | None = None) -> Callable[..., Awaitable[int]]:
        prepared: dict[str, list[Stream]] = {}

        async def drive(session_ids: list[str], start_ns: int, window: tuple[int, int]) -> int:
            key = session_ids[0]
            if self.feeder is not None:
                if not start_ns:
                    await self.feeder.open(session_ids)
                    return 0
                return await self.feeder.run(key, rate, start_ns, window)
            if not start_ns:
                prepared[key] = await self.producer.open(session_ids)
                return 0
            return await self.producer.run(prepared.pop(key), rate, start_ns, window)

        return drive

    def broadcast(self, rate: float, frame_bytes: int) -> Callable[..., Awaitable[int]]:
        async def drive(session_ids: list[str], start_ns: int, window: tuple[int, int]) -> int:
            if not start_ns:
                return 0
            await asyncio.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
            seconds = (window[1] - time.time_ns()) / 1e9
            await self.raw.http.get(
                f"{self.raw.server.http}/start",
                params={"rate": rate, "seconds": seconds, "frame_bytes": frame_bytes},
            )
            await asyncio.sleep(max(0.0, (window[1] - time.time_ns()) / 1e9) + 0.05)
            return int(rate * self.seconds) * len(session_ids)

        return drive


def summarize(
    kind: str,
    *,
    subscribers: int,
    connected: int,
    sessions: int,
    appended: int,
    per_session: int,
    before: dict[str, Any],
    after: dict[str, Any],
    reports: list[dict[str, Any]],
    rss: tuple[int, int, int],
) -> dict[str, Any]:
    seconds = (after["at"] - before["at"]) / 1e9
    frames = sum(r["frames"] for r in reports)
    tokens = sum(r["tokens"] for r in reports)
    hist = LatencyHistogram()
    for report in reports:
        hist.merge(report["hist"])
    series: dict[int, list[int]] = {}
    for report in reports:
        for second, (count, total, worst) in report["series"].items():
            row = series.setdefault(int(second), [0, 0, 0])
            row[0] += count
            row[1] += total
            row[2] = max(row[2], worst)
    mean_by_second = [series[s][1] / series[s][0] / 1000 for s in sorted(series) if series[s][0]]
    user_sys = {
        name: (round(u - before["cpu"][name][0], 3), round(s - before["cpu"][name][1], 3))
        for name, (u, s) in after["cpu"].items()
    }
    cpu = {name: round(u + s, 3) for name, (u, s) in user_sys.items()}
    foreign = (after["machine"] - before["machine"] - sum(cpu.values())) / seconds
    server_cpu = cpu[kind]
    loadgen_cpu = sum(v for name, v in cpu.items() if name.startswith("loadgen"))
    calls_before, calls_after = before["redis"]["calls"], after["redis"]["calls"]
    calls = {
        name: n - calls_before.get(name, 0)
        for name, n in calls_after.items()
        if n - calls_before.get(name, 0)
    }
    producer_calls = after["write_calls"] - before["write_calls"]
    server_cmds = server_bytes = 0
    for client_id, (cmds, out) in after["redis"]["clients"].items():
        was = before["redis"]["clients"].get(client_id, (0, 0))
        server_cmds += cmds - was[0]
        server_bytes += out - was[1]
    result: dict[str, Any] = {
        "kind": kind,
        "sessions": sessions,
        "subscribers": subscribers,
        "connected": connected,
        "seconds": round(seconds, 3),
        "frames": frames,
        "frames_per_second": frames / seconds,
        "token_deliveries_per_second": tokens / seconds,
        "tokens_per_frame": tokens / frames if frames else float("nan"),
        "frame_bytes": sum(r["bytes"] for r in reports) / frames if frames else float("nan"),
        "latency_ms_p50": hist.percentile_ms(50),
        "latency_ms_p99": hist.percentile_ms(99),
        "latency_ms_max": hist.percentile_ms(100),
        "lag_growth_ms_per_second": (
            (mean_by_second[-1] - mean_by_second[0]) / (len(mean_by_second) - 1)
            if len(mean_by_second) > 1
            else 0.0
        ),
        "mean_latency_ms_by_second": [round(v, 2) for v in mean_by_second],
        "snapshots": sum(r["snapshots"] for r in reports),
        "closes": {code: n for r in reports for code, n in r["closes"].items()},
        "cpu_seconds": cpu,
        "cpu_user_sys_seconds": user_sys,
        "server_user_share": user_sys[kind][0] / server_cpu if server_cpu else float("nan"),
        "other_processes_cpu_share": round(foreign, 3),
        "cpu_share_of_one_core": {name: round(v / seconds, 3) for name, v in cpu.items()},
        "loadgen_cpu_share_of_one_core": round(loadgen_cpu / seconds, 3),
        "machine_cpu_share": round(sum(cpu.values()) / seconds / (os.cpu_count() or 1), 3),
        "server_cpu_us_per_frame": server_cpu / frames * 1e6 if frames else float("nan"),
        "loadgen_cpu_us_per_frame": loadgen_cpu / frames * 1e6 if frames else float("nan"),
        "server_rss_mb": rss[2] / 2**20,
        "server_rss_idle_mb": rss[0] / 2**20,
        "server_rss_per_connection_kb": (rss[1] - rss[0]) / max(connected, 1) / 1024,
        "redis_calls": calls,
        "calls_by_node": calls_delta(before["redis"]["calls_by_node"], after["redis"]["calls_by_node"]),
    }
    if kind in ("relay", "naive"):
        expected = appended * per_session
        result.update(
            tokens_appended=appended,
            delivered_share=tokens / expected if expected else float("nan"),
            server_redis_commands=server_cmds,
            server_redis_commands_per_frame=server_cmds / frames if frames else float("nan"),
            redis_bytes_to_server_per_frame=server_bytes / frames if frames else float("nan"),
            server_script_reads=calls.get("evalsha", 0) - producer_calls,
            server_commands_by_name=relay_side(calls, producer_calls),
            producer_commands_per_token=(
                producer_calls + sum(calls.get(c, 0) for c in _WRITE_SCRIPT_COMMANDS)
            )
            / appended
            if appended
            else float("nan"),
            producer_write_calls=producer_calls,
            producer_cpu_us_per_token=cpu["producer"] / appended * 1e6 if appended else float("nan"),
            redis_cpu_us_per_token=cpu["redis"] / appended * 1e6 if appended else float("nan"),
        )
        result["sustained"] = bool(
            result["delivered_share"] >= SUSTAINED_SHARE
            and result["lag_growth_ms_per_second"] < SUSTAINED_LAG_GROWTH_MS_PER_S
            and result["latency_ms_p99"] < SUSTAINED_P99_MS
            and result["snapshots"] == 0
            and connected == subscribers
        )
    if kind == "relay":
        stats_before, stats_after = before["stats"], after["stats"]
        result["relay_frames_sent"] = stats_after["frames_sent"] - stats_before["frames_sent"]
    return result


#: Commands the WRITE script runs (the producer's); everything else in the window is the relay's (its reads,
#: pub/sub, presence) or the benchmark's own INFO / CLIENT LIST.
_WRITE_SCRIPT_COMMANDS = (
    "xadd",
    "spublish",
    "append",
    "hset",
    "hmget",
    "hdel",
    "expire",
    "lindex",
    "lrem",
    "del",
)
_BENCH_COMMANDS = ("info", "client|list")


def relay_side(calls: dict[str, int], producer_calls: int) -> dict[str, int]:
    """Commandstats deltas that are not the producer's writes: the relay's reads, pub/sub and presence."""
    side = {
        name: n
        for name, n in calls.items()
        if name not in _WRITE_SCRIPT_COMMANDS + _BENCH_COMMANDS + ("evalsha",)
    }
    if calls.get("evalsha", 0) > producer_calls:
        side["evalsha"] = calls["evalsha"] - producer_calls
    return side


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure over runs (booleans: all runs)."""
    summary: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, bool):
            summary[key] = all(run[key] for run in runs)
        elif isinstance(value, int | float):
            summary[key] = median([run[key] for run in runs])
        elif key == "cpu_share_of_one_core":
            summary[key] = {name: median([run[key][name] for run in runs]) for name in value}
        elif isinstance(value, str):
            summary[key] = value
    return summary


def line(kind: str, run: dict[str, Any]) -> str:
    busiest = max(run["cpu_share_of_one_core"].items(), key=lambda item: item[1])
    return (
        f"  {kind:<5} {run['subscribers']:>5} subs: {run['token_deliveries_per_second']:>10,.0f} tok/s "
        f"{run['frames_per_second']:>9,.0f} frames/s  p50 {run['latency_ms_p50']:6.1f} ms  "
        f"p99 {run['latency_ms_p99']:7.1f} ms  {run['server_cpu_us_per_frame']:5.2f} µs/frame  "
        f"busiest {busiest[0]} {busiest[1]:.2f}"
    )


# --- scenarios


@dataclass
class Scenario:
    name: str
    sessions: int
    per_session: int
    rate: float  # tokens per second per session

    @property
    def subscribers(self) -> int:
        return self.sessions * self.per_session


async def relay_vs_raw(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    """`runs` paired runs, each on a fresh relay process: the relay, then raw broadcast at the same rate and
    frame size."""
    relay_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    log(
        f"{scenario.name}: {scenario.sessions} session(s) x {scenario.per_session}, {scenario.rate:g} tok/s each"
    )
    for _ in range(bench.runs):
        server = relay_server(bench.redis).start()
        try:
            target = Target("relay", server)
            run = await bench.run(
                target, scenario.sessions, scenario.per_session, bench.produce(scenario.rate)
            )
            await target.http.aclose()
        finally:
            server.stop()
        relay_runs.append(run)
        log(line("relay", run))
        frame_bytes = int(run["frame_bytes"]) if run["frames"] else 200
        raw = await bench.run(
            bench.raw, scenario.sessions, scenario.per_session, bench.broadcast(scenario.rate, frame_bytes)
        )
        raw_runs.append(raw)
        log(line("raw", raw))
    relay, raw = medians(relay_runs), medians(raw_runs)
    ratios = [
        r["server_cpu_us_per_frame"] / b["server_cpu_us_per_frame"]
        for r, b in zip(relay_runs, raw_runs, strict=True)
    ]
    return {
        "scenario": scenario.__dict__,
        "relay": relay,
        "raw_broadcast": raw,
        "relay_cpu_per_frame_vs_raw": median(ratios),
        "runs": {"relay": relay_runs, "raw_broadcast": raw_runs},
    }


async def scrape_every_second(url: str) -> None:
    """What an eager Prometheus does to a relay with metrics on: a scrape a second (its cost counts)."""
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            (await client.get(url)).raise_for_status()
            await asyncio.sleep(1.0)  # the scrape interval


async def metrics_on_off(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    """Part 'metrics': `runs` pairs of runs, each on a fresh relay, without a metrics port and with one
    (scraped every second), alternating which goes first; relay CPU per delivered frame, per pair."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    log(
        f"metrics off/on, {scenario.name}: {scenario.sessions} x {scenario.per_session}, {scenario.rate:g} tok/s"
    )
    for n in range(bench.runs):
        for variant in ("off", "on") if n % 2 == 0 else ("on", "off"):
            server = relay_server(bench.redis, metrics=variant == "on").start()
            scraping = (
                asyncio.create_task(scrape_every_second(server.ready["metrics"])) if variant == "on" else None
            )
            try:
                target = Target("relay", server)
                run = await bench.run(
                    target, scenario.sessions, scenario.per_session, bench.produce(scenario.rate)
                )
                await target.http.aclose()
            finally:
                if scraping is not None:
                    scraping.cancel()
                    await asyncio.gather(scraping, return_exceptions=True)
                server.stop()
            runs[variant].append(run)
            log(line(f"metrics {variant}", run))
    ratios = [
        round(on["server_cpu_us_per_frame"] / off["server_cpu_us_per_frame"], 4)
        for on, off in zip(runs["on"], runs["off"], strict=True)
    ]
    log(f"{scenario.name}: relay CPU per frame, metrics on/off per pair {ratios}, median {median(ratios)}")
    return {
        "scenario": scenario.__dict__,
        "off": medians(runs["off"]),
        "on": medians(runs["on"]),
        "cpu_per_frame_on_vs_off_per_pair": ratios,
        "cpu_per_frame_on_vs_off_median": median(ratios),
        "runs": runs,
    }


async def sustained_sweep(
    bench: Bench, kind: str, per_session: int, rates: list[float], target: Target | None = None
) -> dict[str, Any]:
    """Raise the token rate of one session until delivery is no longer sustained; repeat the best rate."""
    steps: list[dict[str, Any]] = []
    best: float | None = None
    log(f"sustained sweep: {kind}, one session x {per_session}")

    async def once(rate: float) -> dict[str, Any]:
        if target is not None:
            return await bench.run(target, 1, per_session, bench.produce(rate))
        server = relay_server(bench.redis).start()
        try:
            relay = Target("relay", server)
            run = await bench.run(relay, 1, per_session, bench.produce(rate))
            await relay.http.aclose()
            return run
        finally:
            server.stop()

    failures = 0
    for rate in rates:
        run = await once(rate)
        run["rate"] = rate
        steps.append(run)
        log(line(kind, run) + f"  @ {rate:g} tok/s  sustained={run['sustained']}")
        if run["sustained"]:
            best, failures = rate, 0
        else:
            failures += 1
            if failures == 2:
                break
    repeats: list[dict[str, Any]] = []
    if best is not None:
        repeats = [next(s for s in steps if s.get("rate") == best)]
        for _ in range(bench.runs - 1):
            run = await once(best)
            run["rate"] = best
            repeats.append(run)
            log(line(kind, run) + f"  @ {best:g} tok/s (repeat)  sustained={run['sustained']}")
    summary = medians(repeats) if repeats else {}
    return {
        "kind": kind,
        "subscribers": per_session,
        "max_sustained_rate": best,
        "max_sustained_token_deliveries_per_second": summary.get("token_deliveries_per_second", 0.0),
        "at_max": summary,
        "steps": steps,
        "repeats": repeats,
    }


def storm_times(reports: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    """Each subscriber's time from its own first connection attempt until it was done (caught up, or live),
    as p50/p99/max over all `expected` subscribers (None where that share was not done in the time given);
    the storm's, from the first attempt until the last was done; and the parts of the median subscriber's
    time (to TCP connected, to upgraded, to its first frame)."""
    rows = [
        [r["started_ns"] / 1e6 + ms for ms in phase] for r in reports for phase in r["phases_ms"]
    ]  # absolute ms: attempted, connected, upgraded, first frame, done
    each = sorted(row[4] - row[0] for row in rows) + [float("inf")] * (expected - len(rows))
    if not rows:
        return {"done": 0, "each_ms_p50": None, "each_ms_p99": None, "each_ms_max": None}

    def finite(value: float) -> float | None:
        return round(value, 1) if value != float("inf") else None

    return {
        "done": len(rows),
        "all_done_ms": finite(max(row[4] for row in rows) - min(row[0] for row in rows)),
        "each_ms_p50": finite(percentile(each, 50)),
        "each_ms_p99": finite(percentile(each, 99)),
        "each_ms_max": finite(each[-1]),
        "to_connected_ms_p50": percentile(sorted(row[1] - row[0] for row in rows), 50),
        "to_upgraded_ms_p50": percentile(sorted(row[2] - row[0] for row in rows), 50),
        "to_first_frame_ms_p50": percentile(sorted(row[3] - row[0] for row in rows), 50),
        "to_upgraded_ms_max": max(row[2] - row[0] for row in rows),
    }


def median_or_none(values: list[Any]) -> Any:
    """The median, where a None (not reached in the time given) ranks above every number."""
    ranked = sorted(values, key=lambda v: (v is None, v if v is not None else 0))
    return ranked[len(ranked) // 2]


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def versions(baseline: Path | None) -> list[tuple[str, Path]]:
    """The relay code each storm part runs: with ``--baseline-code``, that code ("before") and this
    ("after"), alternating which goes first from one run to the next."""
    return [("before", baseline), ("after", RELAY_CODE)] if baseline is not None else [("this", RELAY_CODE)]


T = TypeVar("T")


def in_turn(labels: list[T], run: int) -> list[T]:
    """`labels` in order on even runs, reversed on odd ones: which version goes first alternates."""
    return labels if run % 2 == 0 else labels[::-1]


async def catch_up(
    bench: Bench, subscribers: int, behind: int, codes: list[tuple[str, Path]]
) -> dict[str, list[dict[str, Any]]]:
    """Subscribers resuming `behind` events back, all at the same instant, on a quiet session: each one's
    time from its connection attempt until it has received all `behind` events. One relay per version in
    `codes`, all running at once; each run storms every relay in turn (which goes first alternating from run
    to run), so that a machine getting busier or quieter during the part weighs on every version alike."""
    servers = [(label, relay_server(bench.redis, code=code).start()) for label, code in codes]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in codes}
    try:
        for number in range(bench.runs):
            for label, server in in_turn(servers, number):
                runs[label].append(await _storm_once(bench, server, subscribers, behind))
                run = runs[label][-1]
                log(
                    f"  {label}: catch-up {subscribers} x {behind} behind: each p50 {run['each_ms_p50']} ms, "
                    f"p99 {run['each_ms_p99']} ms, all done {run['all_done_ms']} ms; relay CPU "
                    f"{run['relay_cpu_ms']:.1f} ms, Redis {run['redis_cpu_ms']:.1f} ms, load generator "
                    f"{run['loadgen_cpu_ms']:.1f} ms"
                )
    finally:
        for _, server in servers:
            server.stop()
    return runs


async def _storm_once(bench: Bench, server: BenchServer, subscribers: int, behind: int) -> dict[str, Any]:
    (stream,) = await bench.producer.open(bench.session_ids(1))
    offset = await bench.producer.backlog(stream, behind)
    path = f"/v1/sessions/{stream.session_id}/stream?after={offset}"
    await wait_until_quiet(10.0)
    pids = {
        "relay": [server.pid],
        "redis": list(bench.redis.node_pids().values()),
        "loadgen": bench.load.pids,
    }
    started = _run_times(pids)
    reports = await bench.load.catch_up(server.url, [path] * subscribers, behind, 120)
    spent = {role: (ns - started[role]) / 1e6 for role, ns in _run_times(pids).items()}
    return {
        **storm_times(reports, subscribers),
        "incomplete": sum(r["incomplete"] + r["failed"] for r in reports),
        "relay_cpu_ms": round(spent["relay"], 2),
        "redis_cpu_ms": round(spent["redis"], 2),
        "loadgen_cpu_ms": round(spent["loadgen"], 2),
        "relay_cpu_us_per_event_delivered": spent["relay"] * 1e3 / (subscribers * behind),
    }


def _run_times(pids: dict[str, list[int]]) -> dict[str, int]:
    """CPU nanoseconds so far of each role's processes together (`run_time_ns`)."""
    return {role: sum(run_time_ns(pid) for pid in role_pids) for role, role_pids in pids.items()}


def summarized(subscribers: int, behind: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {key: median_or_none([run[key] for run in runs]) for key in runs[0]}
    return {"subscribers": subscribers, "events_behind": behind, **summary, "runs": runs}


def cpu_used(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    return {key: sum(after[key]) - sum(before[key]) for key in after}


async def catch_up_versions(bench: Bench, baseline: Path | None) -> list[dict[str, Any]]:
    """Part 'catchup': one resume and 100 at once, 5,000 events behind, per relay version (every version's
    relay running at once, taking turns storm by storm); the storm's p99 over one resume's, per version."""
    codes = versions(baseline)
    results = []
    for subscribers in (1, 100):
        log(f"catch-up, {subscribers} at once, relays {', '.join(label for label, _ in codes)}")
        runs = await catch_up(bench, subscribers, 5000, codes)
        results += [{"version": label, **summarized(subscribers, 5000, runs[label])} for label, _ in codes]
    for label, _ in codes:
        one, storm = (r for r in results if r["version"] == label)
        if one["each_ms_p99"] and storm["each_ms_p99"]:
            storm["p99_over_one_resume"] = round(storm["each_ms_p99"] / one["each_ms_p99"], 2)
            log(
                f"  {label}: 100 at once, p99 {storm['each_ms_p99']} ms = {storm['p99_over_one_resume']}x one"
            )
    if baseline is not None:
        for before, after in zip(results[::2], results[1::2], strict=True):
            after["paired_over_before"] = paired = paired_ratios(before["runs"], after["runs"])
            log(f"  {after['subscribers']} at once, after / before, run by run (median, quartiles): {paired}")
    return results


def paired_ratios(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each after-run over the before-run it took turns with: the median and quartiles of those ratios, for
    the p99 and the relay's CPU. Storms next to each other met the same machine; runs minutes apart did not."""
    paired = {}
    for key in ("each_ms_p99", "relay_cpu_ms"):
        ratios = sorted(a[key] / b[key] for a, b in zip(after, before, strict=True) if a[key] and b[key])
        if ratios:
            quartile = len(ratios) // 4
            paired[key] = [
                round(ratios[len(ratios) // 2], 3),
                round(ratios[quartile], 3),
                round(ratios[-1 - quartile], 3),
            ]
    return paired


@dataclass
class Storm:
    """Part 'reconnect': `subscribers` reconnect at once to a relay started a moment before, while one
    generation streams at `rate` tokens/s; their offsets are spread evenly over the last `spread` seconds of
    the stream. Each one's time from its attempt until a frame's newest token is under 100 ms old on receipt (it
    is at the live edge: `bench.fanout_client.LIVE_EDGE_NS`), then `hold` seconds of the live tail."""

    subscribers: int = 1000
    rate: float = 200.0
    spread: float = 10.0
    hold: float = 2.0
    give_up: float = 20.0  # a subscriber not live this long after the storm began counts as never


async def reconnect_once(bench: Bench, storm: Storm, code: Path) -> dict[str, Any]:
    (stream,) = await bench.producer.open(bench.session_ids(1))
    offsets: list[tuple[int, str]] = []  # (append time, offset) of every delta
    producing = asyncio.create_task(bench.producer.live(stream, storm.rate, offsets))
    server = relay_server(bench.redis, name="relay-storm", code=code)
    try:
        await asyncio.sleep(storm.spread + 1.0)
        server.start()
        rss_idle = rss_bytes(server.pid)
        newest = len(offsets) - 1
        oldest = max(0, newest - int(storm.rate * storm.spread))
        picks = [offsets[oldest + (newest - oldest) * k // max(1, storm.subscribers - 1)][1]
                 for k in range(storm.subscribers)]  # fmt: skip
        paths = [f"/v1/sessions/{stream.session_id}/stream?after={offset}" for offset in picks]
        before = bench.cpu(Target("relay", server))
        reports = await bench.load.catch_up(server.url, paths, 0, storm.give_up, hold=storm.hold)
        used = cpu_used(before, bench.cpu(Target("relay", server)))
        peak_rss = peak_rss_bytes(server.pid)
    finally:
        producing.cancel()
        await asyncio.gather(producing, return_exceptions=True)
        server.stop()
    tail = LatencyHistogram()
    for report in reports:
        tail.merge(report["window"]["hist"])
    return {
        **storm_times(reports, storm.subscribers),
        "events_behind_max": newest - oldest,
        "incomplete": sum(r["incomplete"] + r["failed"] for r in reports),
        "connect_errors": [r["window"]["errors"] for r in reports],
        "relay_rss_idle_mb": rss_idle / 1e6,
        "relay_rss_peak_mb": peak_rss / 1e6,
        "relay_cpu_seconds": used["relay"],
        "redis_cpu_seconds": used["redis"],
        "loadgen_cpu_seconds": sum(v for k, v in used.items() if k.startswith("loadgen")),
        "tail_after_ms_p50": tail.percentile_ms(50),
        "tail_after_ms_p99": tail.percentile_ms(99),
        "snapshots": sum(r["window"]["snapshots"] for r in reports),
    }


async def reconnect(bench: Bench, storm: Storm, baseline: Path | None) -> dict[str, Any]:
    """Part 'reconnect': `runs` storms per relay version, alternating which goes first."""
    labels = versions(baseline)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in labels}
    log(
        f"reconnect storm: {storm.subscribers} subscribers, {storm.rate:g} tok/s, offsets over {storm.spread:g} s"
    )
    for n in range(bench.runs):
        for label, code in in_turn(labels, n):
            await wait_until_quiet(10.0)
            run = await reconnect_once(bench, storm, code)
            runs[label].append(run)
            log(
                f"  {label}: {run['done']} of {storm.subscribers} live within {storm.give_up:g} s; each "
                f"p50/p99/max {run['each_ms_p50']}/{run['each_ms_p99']}/{run['each_ms_max']} ms; "
                f"upgraded p50 {run['to_upgraded_ms_p50']:.0f} max {run['to_upgraded_ms_max']:.0f} ms; "
                f"RSS peak {run['relay_rss_peak_mb']:.0f} MB; relay CPU {run['relay_cpu_seconds']:.2f} s; "
                f"tail after: p99 {run['tail_after_ms_p99']:.1f} ms"
            )
    summary = {label: {k: median_or_none([r[k] for r in rs]) for k in rs[0] if k != "connect_errors"}
               for label, rs in runs.items()}  # fmt: skip
    return {"storm": storm.__dict__, **summary, "runs": runs}


async def tail(bench: Bench, baseline: Path | None, rate: float) -> dict[str, Any]:
    """Part 'tail': 1,000 subscribers of one session at `rate` tok/s, per relay version, alternating; each
    version's deltas are written by that version's store, in a producer process of its own."""
    labels = versions(baseline)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in labels}
    log(f"tail: one session x 1000, {rate:g} tok/s")
    for n in range(bench.runs):
        for label, code in in_turn(labels, n):
            # Each relay is fed by its own code's writes (how the write script publishes has changed).
            bench.feeder = await CodeProducer(bench.redis, code).start()
            server = relay_server(bench.redis, code=code).start()
            try:
                target = Target("relay", server)
                run = await bench.run(target, 1, 1000, bench.produce(rate))
                await target.http.aclose()
            finally:
                server.stop()
                await bench.feeder.close()
                bench.feeder = None
            runs[label].append(run)
            log(line(f"relay {label}", run))
    return {label: medians(rs) for label, rs in runs.items()} | {"runs": runs}


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory the process has had (VmHWM)."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) * 1024
    return 0


# --- main


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The four targets, met or missed, and by how much."""
    out: dict[str, Any] = {}
    scenarios = {s["scenario"]["name"]: s for s in result["scenarios"]}
    ratios = {name: s["relay_cpu_per_frame_vs_raw"] for name, s in scenarios.items()}
    kept_up = [ratios[name] for name, s in scenarios.items() if s["relay"]["sustained"]]
    worst = max(kept_up) if kept_up else float("nan")
    out["relay_cost_within_1.5x_raw"] = {
        "met": worst <= 1.5,
        "worst_ratio_where_the_relay_kept_up": worst,
        "ratios": ratios,
    }
    one = scenarios.get("one-session-1000")
    if one is not None:
        relay = one["relay"]
        out["1000_subscribers_200_tok_s_p99_under_25ms"] = {
            "met": bool(relay["latency_ms_p99"] < 25 and relay["sustained"]),
            "p99_ms": relay["latency_ms_p99"],
            "token_deliveries_per_second": relay["token_deliveries_per_second"],
            "delivered_share": relay["delivered_share"],
            "lag_growth_ms_per_second": relay["lag_growth_ms_per_second"],
        }
    sweeps = result.get("sustained", {})
    relay_max = max(
        (s["max_sustained_token_deliveries_per_second"] for s in sweeps.get("relay", [])), default=0.0
    )
    naive_max = max(
        (s["max_sustained_token_deliveries_per_second"] for s in sweeps.get("naive", [])), default=0.0
    )
    if relay_max and naive_max:
        out["10x_naive_sustained"] = {
            "met": relay_max >= 10 * naive_max,
            "relay": relay_max,
            "naive": naive_max,
            "ratio": relay_max / naive_max,
        }
    five = scenarios.get("one-session-5000")
    if five is not None:
        rss = five["relay"]["server_rss_mb"]
        out["5000_subscribers_rss_under_300MB"] = {
            "met": rss < 300 and five["relay"]["connected"] == 5000,
            "rss_mb": rss,
            "per_connection_kb": five["relay"]["server_rss_per_connection_kb"],
        }
    return out


async def bench_main(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Fill `result` part by part (what was measured survives a failure later on)."""
    quick = args.quick
    scenarios = [
        Scenario("one-session-100", 1, 100, args.rate),
        Scenario("one-session-1000", 1, 1000, args.rate),
        Scenario("one-session-5000", 1, 5000, args.rate),
        Scenario("sessions-1000x3", 1000, 3, args.session_rate),
        Scenario("sessions-1000x3-overload", 1000, 3, 2 * args.session_rate),
    ]
    if quick:
        scenarios = [scenarios[0], scenarios[1], Scenario("sessions-200x3", 200, 3, args.session_rate)]
    relay_rates = [200.0, 1000.0, 3000.0, 10000.0] if not quick else [200.0, 2000.0]
    naive_rates = [6.25, 12.5, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0]
    redis = Backend().start()
    load = LoadGenerator(args.clients, max_seconds=4 * 3600)
    raw = module_server("bench.raw_broadcast", ["--port", "0"], redis).start()
    naive = module_server("bench.naive_relay", ["--port", "0", "--redis-url", redis.url], redis).start()
    producer = Producer(redis)
    bench = Bench(
        redis,
        producer,
        load,
        args.seconds,
        args.warmup,
        args.runs,
        raw_target=Target("raw", raw),
        naive_target=Target("naive", naive),
    )
    result.update(scenarios=[], sustained={"relay": [], "naive": []})
    parts = set(args.parts.split(","))
    try:
        chosen = [
            scenario
            for scenario in scenarios
            if parts & {"scenarios", "many" if scenario.sessions > 1 else "one"}
        ]
        result["scenarios"] = [await relay_vs_raw(bench, scenario) for scenario in chosen]
        if "ceiling" in parts:
            log("raw broadcast ceiling (as fast as the subscribers drain)")
            ceiling = [
                await bench.run(bench.raw, 1, 1000, bench.broadcast(0, 200)) for _ in range(bench.runs)
            ]
            for run in ceiling:
                log(line("raw", run))
            result["raw_broadcast_ceiling_1000"] = {"median": medians(ceiling), "runs": ceiling}
        if "sustained" in parts:
            result["sustained"]["relay"].append(await sustained_sweep(bench, "relay", 1000, relay_rates))
            for subscribers in [100, 1000] if not quick else [100]:
                result["sustained"]["naive"].append(
                    await sustained_sweep(bench, "naive", subscribers, naive_rates, target=bench.naive)
                )
        if "metrics" in parts:
            pairs = [scenarios[1], scenarios[3]] if not quick else [scenarios[1], scenarios[2]]
            result["metrics_cost"] = [await metrics_on_off(bench, scenario) for scenario in pairs]
        if "catchup" in parts:
            result["catch_up"] = await catch_up_versions(bench, args.baseline_code)
        if "reconnect" in parts:
            storm = Storm(args.storm_subscribers, args.rate)
            result["reconnect"] = await reconnect(bench, storm, args.baseline_code)
        if "tail" in parts:
            result["tail"] = await tail(bench, args.baseline_code, args.rate)
    finally:
        await producer.close()
        await bench.close()
        load.close()
        raw.stop()
        naive.stop()
        redis.close()
    result["targets"] = targets(result)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="runs per figure; medians are reported (default 3)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="traffic before the window (default 1)")
    parser.add_argument("--clients", type=int, default=3, help="load generator processes (default 3)")
    parser.add_argument("--rate", type=float, default=200.0, help="tokens/s of a one-session scenario")
    parser.add_argument(
        "--session-rate",
        type=float,
        default=5.0,
        help="tokens/s per session, 1,000 sessions (default 5; the overload scenario runs twice that)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run, 2 s windows, fewer scenarios")
    parser.add_argument(
        "--parts",
        default="scenarios,ceiling,sustained,catchup",
        help="what to measure, comma-separated (default: all of scenarios,ceiling,sustained,catchup; "
        "'one' or 'many' for only the one-session or only the many-session scenarios; 'metrics' for the "
        "relay without and with a metrics port, 1,000 subscribers of one session and 1,000 sessions x 3; "
        "'reconnect' for a storm of reconnects to a freshly started relay during a live generation; 'tail' for "
        "1,000 subscribers of one session, before and after with --baseline-code)",
    )
    parser.add_argument(
        "--relay-code",
        type=Path,
        default=ROOT,
        help="run the relay from this copy of the code (e.g. an older version, for before/after)",
    )
    parser.add_argument(
        "--baseline-code",
        type=Path,
        help="with the parts catchup, reconnect and tail: also run the relay from this copy of the code "
        "(before), alternating with --relay-code (after)",
    )
    parser.add_argument(
        "--storm-subscribers",
        type=int,
        default=1000,
        help="subscribers of the reconnect storm (default 1000)",
    )
    parser.add_argument("--output", help="results name (default: fanout, or fanout-quick with --quick)")
    args = parser.parse_args()
    global RELAY_CODE
    RELAY_CODE = args.relay_code.resolve()
    if args.baseline_code is not None:
        args.baseline_code = args.baseline_code.resolve()
    if args.quick:
        args.runs, args.seconds, args.warmup = 1, 2.0, 0.5
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 5,000 sockets here, in Redis and the relay
    if hard < 12_000:
        log(f"open-files limit is {hard}: the 5,000-subscriber scenarios may fail")
    command = "./dev bench fanout " + " ".join(sys.argv[1:])
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    result: dict[str, Any] = {"command": command.strip(), "settings": settings}
    name = args.output or ("fanout" if not args.quick else "fanout-quick")
    try:
        with runner:
            runner.run(bench_main(args, result))
    except BaseException as exc:
        result["error"] = repr(exc)
        print("saved what was measured before the failure:", save(name + "-partial", result))
        raise
    print(json.dumps(result["targets"], indent=2, default=str))
    print("saved", save(name, result))


if __name__ == "__main__":
    main()
