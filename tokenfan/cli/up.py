"""``tokenfan up``: the whole system on one machine, each component its own process.

Redis comes from ``REDIS_URL``, or is an embedded Valkey started here; the upstream comes from
``OPENAI_BASE_URL``, or is the built-in simulator started here. Every process serves its metrics, on ports
from ``--metrics-port`` up, and the banner names them. Everything stops on Ctrl-C, or as soon as any
component dies (its exit is reported, nothing is left half-running).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.cli.processes import ChildProcess
from tokenfan.runtime.auth import new_api_key, new_token_secret
from tokenfan.runtime.settings import Settings

__all__ = ["Stack"]


def _port_or_free(host: str, wanted: int) -> int:
    """`wanted` if it is free, else any free port (0 asks for any): the number, known before the start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, wanted))
        except OSError:
            probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _with_page_origins(env: dict[str, str], host: str, api_port: int) -> str:
    """TOKENFAN_ALLOWED_ORIGINS plus the origin of the page the API serves, so that the page may open
    relay connections; a loopback host is reached as ``localhost`` too."""
    origins = [origin.strip() for origin in env.get("TOKENFAN_ALLOWED_ORIGINS", "").split(",")]
    hosts = [host, "localhost"] if host in ("127.0.0.1", "localhost") else [host]
    for name in hosts:
        origin = f"http://{name}:{api_port}"
        if origin not in origins:
            origins.append(origin)
    return ",".join(origin for origin in origins if origin)


@dataclass
class Stack:
    host: str
    api_port: int
    relay_port: int
    workers: int
    tokens_per_second: float
    settings: Settings
    metrics_port: int = 9461
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[ChildProcess] = field(default_factory=list)
    redis: EmbeddedRedis | None = None
    demo_key: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, settings: Settings) -> Stack:
        return cls(
            args.host,
            args.api_port,
            args.relay_port,
            args.workers,
            args.tokens_per_second,
            settings,
            metrics_port=args.metrics_port,
        )

    def run(self) -> int:
        stopping = False

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            self._start()
            while not stopping:
                dead = next((child for child in self.children if not child.alive()), None)
                if dead is not None:
                    code = dead.process.returncode if dead.process else None
                    print(f"\ntokenfan: {dead.name} exited ({code}); stopping.")
                    return 1
                time.sleep(0.2)
            print("\ntokenfan: stopping.")
            return 0
        except RuntimeError as exc:
            print(f"tokenfan: {exc}", file=sys.stderr)
            return 1
        finally:
            for child in reversed(self.children):
                child.stop()
            if self.redis is not None:
                self.redis.close()

    def _start(self) -> None:
        env = dict(self.environ)
        env.setdefault("TOKENFAN_LOG_FORMAT", "console")
        self._demo_credentials(env)
        redis_note = "from REDIS_URL"
        if not env.get("REDIS_URL"):
            self.redis = EmbeddedRedis().start()
            env["REDIS_URL"] = self.redis.url
            redis_note = f"embedded Valkey; data lives in {self.redis.directory} until you stop"
        upstream_note = "from OPENAI_BASE_URL"
        if not env.get("OPENAI_BASE_URL"):
            simulator = self._spawn(
                "simulator",
                ["--host", self.host, "--port", "0", "--tokens-per-second", str(self.tokens_per_second)],
                env,
            )
            env["OPENAI_BASE_URL"] = simulator.wait_ready() + "/v1"
            upstream_note = f"built-in simulator, {self.tokens_per_second:g} tokens/s"
        # The API's port is chosen first: the relay must know the page's origin before it starts.
        api_port = _port_or_free(self.host, self.api_port)
        env["TOKENFAN_ALLOWED_ORIGINS"] = _with_page_origins(env, self.host, api_port)
        relay_port = _port_or_free(self.host, self.relay_port)
        relay = self._spawn("relay", ["--host", self.host, "--port", str(relay_port), *self._metrics(1)], env)
        env["TOKENFAN_PUBLIC_RELAY_URL"] = relay.wait_ready()
        api = self._spawn("api", ["--host", self.host, "--port", str(api_port), *self._metrics(0)], env)
        workers = [
            self._spawn("worker", ["--host", self.host, *self._metrics(2 + n)], env, name=f"worker-{n + 1}")
            for n in range(self.workers)
        ]
        api.wait_ready()
        for worker in workers:
            worker.wait_ready()
        metrics = [child.metrics_url for child in (api, relay, *workers)]
        print(self._banner(api.url, relay.url, env, redis_note, upstream_note, metrics), flush=True)

    def _metrics(self, offset: int) -> list[str]:
        """The metrics flag of the process at `offset` from ``--metrics-port`` (0: a free port each)."""
        wanted = self.metrics_port + offset if self.metrics_port else 0
        return ["--metrics-port", str(_port_or_free(self.host, wanted))]

    def _demo_credentials(self, env: dict[str, str]) -> None:
        """Secure by default, even for the demo: without keys (and not in development mode), a fresh API
        key and token secret for this run only."""
        self.demo_key = None
        if not env.get("TOKENFAN_API_KEYS") and env.get("TOKENFAN_INSECURE_DEV_MODE", "").lower() != "true":
            self.demo_key = new_api_key()
            env["TOKENFAN_API_KEYS"] = f"demo:{self.demo_key}"
            env.setdefault("TOKENFAN_TOKEN_SECRETS", new_token_secret())

    def _spawn(
        self, role: str, args: list[str], env: dict[str, str], name: str | None = None
    ) -> ChildProcess:
        child = ChildProcess(role, args, env=env, name=name).start()
        self.children.append(child)
        return child

    def _banner(  # long: one f-string, the banner as it prints
        self,
        api: str,
        relay: str,
        env: dict[str, str],
        redis_note: str,
        upstream_note: str,
        metrics: list[str],
    ) -> str:
        tokenfan = shlex.quote(str(Path(sys.executable).with_name("tokenfan")))
        body = (
            '{"model": "tokenfan-sim", "messages": [{"role": "user", "content": "Tell me about fan-out."}]}'
        )
        redis_url = env["REDIS_URL"] if self.redis is not None else "(REDIS_URL)"
        top_redis = f"REDIS_URL={shlex.quote(redis_url)} " if self.redis is not None else ""
        if self.demo_key is not None:
            key_line = f"  API key       {self.demo_key}    (generated for this run; TOKENFAN_API_KEYS sets your own)\n"
            credential = f"export TOKENFAN_CREDENTIAL={self.demo_key}\n  "
            auth = '-H "Authorization: Bearer $TOKENFAN_CREDENTIAL" '
        else:
            key_line = "  API key       (from TOKENFAN_API_KEYS, or none in insecure development mode)\n"
            credential, auth = "", ""
        return f"""
tokenfan is up.

  live page     {api}/    (open it in a browser: it asks for the API key below)
  request API   {api}
  relay         {relay}
  Redis         {redis_url}    ({redis_note})
  upstream      {env["OPENAI_BASE_URL"]}    ({upstream_note})
  metrics       {"  ".join(metrics)}    (Prometheus text: API, relay, workers)
{key_line}
Try it from another terminal:

  {credential}# 1. watch session "demo" live (resumes by itself if the connection drops)
  {tokenfan} watch demo --relay {relay}

  # 2. ask for a generation in that session
  curl -s -X POST {api}/v1/sessions/demo/generations {auth}\\
       -H 'content-type: application/json' \\
       -d '{body}'

  # 3. read the session back: every generation, with its text
  curl -s {auth}{api}/v1/sessions/demo

  # 4. watch the whole deployment: rates, latencies, the busiest sessions
  {top_redis}{tokenfan} top --metrics {",".join(metrics)}

Ctrl-C stops everything.
"""
