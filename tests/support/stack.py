"""The system as real child processes on free ports: simulator, relay, API and workers, against one Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.requests import SIMULATOR
from tokenfan.cli.processes import ChildProcess


@dataclass
class RunningStack:
    """simulator + relay + API + workers as child processes on free ports, against one Redis."""

    redis_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    #: With a cluster: `redis_url` lists its seed nodes, and the job queue lives on this plain Redis.
    queue_url: str = ""
    children: list[ChildProcess] = field(default_factory=list)
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tokenfan-test-logs-")))
    simulator_url: str = ""
    relay_url: str = ""
    relay_urls: list[str] = field(default_factory=list)
    api_url: str = ""

    @property
    def cluster(self) -> bool:
        return bool(self.queue_url)

    @property
    def env(self) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith(("TOKENFAN_", "OPENAI_"))
        }
        env.update(
            REDIS_URL=self.redis_url,
            OPENAI_BASE_URL=f"{self.simulator_url}/v1",
            TOKENFAN_LOG_FORMAT="json",
            TOKENFAN_LOG_LEVEL="info",
            # Security has its own tests (tests/system/test_security.py, on a stack with keys); elsewhere it is noise.
            TOKENFAN_INSECURE_DEV_MODE="true",
        )
        if self.cluster:
            env.update(TOKENFAN_REDIS_CLUSTER="true", TOKENFAN_QUEUE_REDIS_URL=self.queue_url)
        env.update(self.extra_env)
        return env

    def spawn(self, role: str, args: list[str] | None = None, *, name: str | None = None) -> ChildProcess:
        name = name or f"{role}-{len(self.children)}"
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own copy of the descriptor
            child = ChildProcess(role, args or [], env=self.env, stderr=log, name=name).start()
        self.children.append(child)
        return child

    def start(
        self,
        *,
        workers: int = 1,
        relays: int = 1,
        api: bool = True,
        relay_port: int = 0,
        api_port: int = 0,
        keyed_simulator: bool = False,
    ) -> RunningStack:
        """Start what is missing, in dependency order: a simulator (unless `simulator_url` names one; with
        `keyed_simulator`, a `KeyedSimulator`: set OPENAI_API_KEY in `extra_env`), a relay on `relay_port`
        and an API on `api_port` (0: a free one; unless not `api`), and `workers` workers. When a component
        fails to start, prints the logs and stops what was started before raising."""
        try:
            if not self.simulator_url:
                self.simulator_url = self._start_simulator(keyed=keyed_simulator)
            for index in range(relays):
                port = str(relay_port if index == 0 else 0)
                name = "relay" if index == 0 else f"relay-{index + 1}"
                self.relay_urls.append(self.spawn("relay", ["--port", port], name=name).wait_ready())
            self.relay_url = self.relay_urls[0] if self.relay_urls else ""
            if api:
                self.api_url = self.spawn("api", ["--port", str(api_port)], name="api").wait_ready()
            for _ in range(workers):
                self.spawn("worker").wait_ready()
        except BaseException:
            print(self.log_tail())
            self.stop()
            raise
        return self

    def _start_simulator(self, *, keyed: bool) -> str:
        if not keyed:
            # It serves only the model tests ask for: any other is refused, as a real provider refuses it.
            args = [
                "--port",
                "0",
                "--tokens-per-second",
                "0",
                "--reply-tokens",
                "48",
                "--models",
                SIMULATOR.model,
            ]
            return self.spawn("simulator", args).wait_ready()
        with (self.logs / "simulator.log").open("ab") as log:  # the child keeps its own descriptor
            simulator = KeyedSimulator("simulator", env=self.env, stderr=log, name="simulator").start()
        self.children.append(simulator)
        return simulator.wait_ready()

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def __enter__(self) -> RunningStack:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def api_client(self) -> httpx.AsyncClient:
        """An HTTP client of the stack's API (close it: ``async with``)."""
        return httpx.AsyncClient(base_url=self.api_url, timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def start_frontends(
    base: RunningStack, extra_env: dict[str, str], *, api: bool = True, relay_port: int = 0
) -> RunningStack:
    """A relay (and, with `api`, an API) with settings of their own, beside `base` and against its Redis.
    Generations accepted by either API are run by `base`'s workers. Stop it with `stop()`."""
    front = RunningStack(
        redis_url=base.redis_url,
        extra_env=extra_env,
        queue_url=base.queue_url,
        simulator_url=base.simulator_url,
    )
    return front.start(workers=0, api=api, relay_port=relay_port)


def free_port() -> int:
    """A port free now, for a process that must be known by its address before it starts (a page's
    origin, a relay restarted in place). Another process could take it in between: rare, and loud."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_environment() -> dict[str, str]:
    """This process's environment without any tokenfan, upstream or Redis configuration."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TOKENFAN_", "OPENAI_")) and key != "REDIS_URL"
    }


#: A simulator that, unlike the CLI's, demands an upstream key: its own environment's OPENAI_API_KEY.
_KEYED_SIMULATOR = """\
import asyncio, os, sys
from tokenfan.cli.simulator import SimulatorConfig, serve
config = SimulatorConfig(tokens_per_second=0, reply_tokens=48, api_key=os.environ["OPENAI_API_KEY"])
asyncio.run(serve(config, host="127.0.0.1", port=0, ready_file=sys.argv[1]))
"""


class KeyedSimulator(ChildProcess):
    """The simulator (same replies as `SIMULATOR`) answering 401 unless sent ``Bearer $OPENAI_API_KEY``."""

    def start(self) -> KeyedSimulator:
        self.ready_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _KEYED_SIMULATOR, str(self.ready_file)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        return self


def relay_process(stack: RunningStack) -> ChildProcess:
    (relay,) = [child for child in stack.children if child.role == "relay" and child.alive()]
    return relay


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")
