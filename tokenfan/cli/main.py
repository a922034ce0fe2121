"""``tokenfan``: one command, one subcommand per component.

    tokenfan up                      everything, on an embedded Redis and the simulator unless configured
    tokenfan api --port 8000         the request API (HTTP + SSE)
    tokenfan relay --port 8001       the WebSocket relay
    tokenfan worker --concurrency N  a worker
    tokenfan simulator --port 8002   the OpenAI-compatible simulator
    tokenfan watch SESSION           print a session live, resuming across disconnects
    tokenfan top --metrics URL,...   a live view of a running deployment, from its metrics and Redis

Every component reads its configuration from the environment (`tokenfan.runtime.settings`); flags only choose
where to listen. ``--ready-file PATH`` makes a server write its URL to PATH once it accepts connections
(and, with ``--metrics-port``, the address of its metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from tokenfan.runtime.logs import configure_logging
from tokenfan.runtime.settings import Settings, SettingsError

__all__ = ["main"]


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coroutine)
    except ImportError:  # pragma: no cover - uvloop is absent only on Windows
        asyncio.run(coroutine)


def _server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=default_port, help=f"port (default: {default_port}; 0 = any)"
    )
    parser.add_argument("--ready-file", help="write {url, pid} here once accepting connections")


def _metrics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve GET /metrics on this port, on --host (default: TOKENFAN_METRICS_PORT; 0 = any)",
    )


def _up_flags(up: argparse.ArgumentParser) -> None:
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--api-port", type=int, default=8000)
    up.add_argument("--relay-port", type=int, default=8001)
    up.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    up.add_argument("--tokens-per-second", type=float, default=30.0, help="simulator pace (default: 30)")
    up.add_argument(
        "--metrics-port",
        type=int,
        default=9461,
        help="metrics of the API on this port, the relay's on the next, the workers' after (default: 9461; "
        "a port in use is replaced by a free one)",
    )


def _top_flags(top: argparse.ArgumentParser) -> None:
    top.add_argument(
        "--metrics",
        action="append",
        required=True,
        help="metrics URLs of the processes to show, comma-separated or repeated (tokenfan up prints them)",
    )
    top.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default: 2)")
    top.add_argument(
        "--iterations", type=int, default=0, help="frames to show, then exit (default: 0 = forever)"
    )
    top.add_argument(
        "--sessions",
        type=int,
        default=10,
        help="busiest sessions to show, from REDIS_URL (default: 10; 0 = none)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfan", description="Streaming fan-out of LLM tokens.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _up_flags(commands.add_parser("up", help="run the whole system locally"))
    for name, port, text in (
        ("api", 8000, "run the request API"),
        ("relay", 8001, "run the WebSocket relay"),
    ):
        server = commands.add_parser(name, help=text)
        _server_flags(server, port)
        _metrics_flag(server)

    worker = commands.add_parser("worker", help="run a worker")
    worker.add_argument(
        "--concurrency", type=int, help="generations at once (default: TOKENFAN_WORKER_CONCURRENCY)"
    )
    worker.add_argument("--ready-file")
    worker.add_argument(
        "--host", default="127.0.0.1", help="interface of the metrics port (default: 127.0.0.1)"
    )
    _metrics_flag(worker)

    simulator = commands.add_parser("simulator", help="run the OpenAI-compatible simulator")
    _server_flags(simulator, 8002)
    simulator.add_argument("--tokens-per-second", type=float, default=50.0, help="0 = as fast as possible")
    simulator.add_argument("--reply-tokens", type=int, default=48, help="default reply length")
    simulator.add_argument(
        "--models", help="comma-separated models to serve; others are refused with 404 (default: any model)"
    )

    secrets = commands.add_parser("secrets", help="make a deployment's API key and token secret files once")
    secrets.add_argument("directory", help="where to keep api_keys and token_secrets")
    _top_flags(commands.add_parser("top", help="a live view of a running deployment"))

    alive = commands.add_parser("alive", help="exit 0 while a liveness file is fresh (a probe)")
    alive.add_argument("file", help="the file a worker touches (TOKENFAN_WORKER_ALIVE_FILE)")
    alive.add_argument("--within", type=float, default=30.0, help="seconds it may be old (default: 30)")

    watch = commands.add_parser("watch", help="print a session live")
    watch.add_argument("session_id")
    watch.add_argument("--relay", default="ws://127.0.0.1:8001", help="relay base URL")
    watch.add_argument("--after", help="resume after this offset")
    watch.add_argument("--json", action="store_true", help="print every frame as a JSON line")
    watch.add_argument(
        "--credential",
        default=os.environ.get("TOKENFAN_CREDENTIAL"),
        help="API key or session token (default: $TOKENFAN_CREDENTIAL)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    command: str = args.command
    try:
        settings = Settings.from_env(metrics_port=getattr(args, "metrics_port", None))
        configure_logging(settings, command)
        _COMMANDS[command](args, settings)
    except SettingsError as exc:  # a configuration that cannot work: one line, no traceback
        print(f"tokenfan {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _verify_storage(settings: Settings) -> None:
    """A Redis that is not what the settings say is a configuration error: say so in one line, at once."""
    from tokenfan.store import verify_storage

    _run(verify_storage(settings))


def _api(args: argparse.Namespace, settings: Settings) -> None:
    from api.http.app import create_app
    from tokenfan.runtime.metrics import Metrics
    from tokenfan.runtime.serving import Lifelong, serve_asgi, stop_this_process
    from tokenfan.runtime.tracing import tracer_from_env

    metrics = Metrics("api", enabled=settings.metrics_port is not None)
    lifelong = Lifelong(stop_this_process)
    app = create_app(settings, metrics=metrics, tracer=tracer_from_env("api"), lifelong=lifelong)
    _verify_storage(settings)
    # SSE responses never end by themselves: give them a few seconds, then close them on shutdown.
    _run(
        serve_asgi(
            app,
            host=args.host,
            port=args.port,
            ready_file=args.ready_file,
            ready_info=metrics.expose(args.host, settings.metrics_port),
            timeout_graceful_shutdown=5,
            # The client is the TCP peer: per-address caps and the access log must not believe an
            # X-Forwarded-For header (uvicorn would, from loopback peers), which anyone can send.
            proxy_headers=False,
        )
    )
    lifelong.check()


def _relay(args: argparse.Namespace, settings: Settings) -> None:
    from api.relay.server import run_relay

    _verify_storage(settings)
    _run(run_relay(settings, host=args.host, port=args.port, ready_file=args.ready_file))


def _worker(args: argparse.Namespace, settings: Settings) -> None:
    from worker.main import run_worker

    _verify_storage(settings)
    _run(run_worker(settings, concurrency=args.concurrency, ready_file=args.ready_file, host=args.host))


def _simulator(args: argparse.Namespace, settings: Settings) -> None:
    from tokenfan.cli.simulator import SimulatorConfig, serve

    models = tuple(name.strip() for name in args.models.split(",") if name.strip()) if args.models else None
    config = SimulatorConfig(
        tokens_per_second=args.tokens_per_second, reply_tokens=args.reply_tokens, models=models
    )
    _run(serve(config, host=args.host, port=args.port, ready_file=args.ready_file))


def _watch(args: argparse.Namespace, settings: Settings) -> None:
    from tokenfan.cli.watch import watch

    _run(watch(args.relay, args.session_id, after=args.after, as_json=args.json, credential=args.credential))


def _top(args: argparse.Namespace, settings: Settings) -> None:
    from tokenfan.cli.top import top

    urls = [url.strip() for value in args.metrics for url in value.split(",") if url.strip()]
    with contextlib.suppress(KeyboardInterrupt):
        _run(top(settings, urls, interval=args.interval, iterations=args.iterations, sessions=args.sessions))


def _alive(args: argparse.Namespace, settings: Settings) -> None:
    """A liveness probe: fails, with one line, once the worker's loop stopped touching its file."""
    try:
        age = time.time() - os.stat(args.file).st_mtime
    except OSError as exc:
        print(f"tokenfan alive: {args.file}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    if age > args.within:
        print(f"tokenfan alive: {args.file} last touched {age:.0f}s ago", file=sys.stderr)
        raise SystemExit(1)


def _secrets(args: argparse.Namespace, settings: Settings) -> None:
    from pathlib import Path

    from tokenfan.cli.secrets import ensure_secrets

    directory = Path(args.directory)
    key = ensure_secrets(directory)
    if key is None:
        print(f"tokenfan secrets: {directory} already holds them; nothing changed", file=sys.stderr)
        return
    print(f"API key (shown once; also in {directory / 'api_keys'}): {key}")


def _up(args: argparse.Namespace, settings: Settings) -> None:
    from tokenfan.cli.up import Stack

    raise SystemExit(Stack.from_args(args, settings).run())


#: Each subcommand's body; imports are local so that a command loads only what it runs.
_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], None]] = {
    "api": _api,
    "relay": _relay,
    "worker": _worker,
    "simulator": _simulator,
    "watch": _watch,
    "alive": _alive,
    "secrets": _secrets,
    "top": _top,
    "up": _up,
}


if __name__ == "__main__":  # pragma: no cover
    main()
