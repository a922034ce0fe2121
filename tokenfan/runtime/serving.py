"""Running our servers: bind (port 0 allowed), announce readiness, stop on SIGINT/SIGTERM.

A server started with ``--ready-file PATH`` writes ``{"url": ..., "pid": ...}`` to PATH once it accepts
connections (with ``"metrics"``, the URL of its metrics, when it serves them). `tokenfan up`, the tests and
the benchmarks wait on that file instead of on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
import uvicorn

__all__ = [
    "Lifelong",
    "bound_url",
    "install_stop_signals",
    "serve_asgi",
    "settle_collector",
    "stop_this_process",
    "write_ready_file",
]

log = structlog.get_logger("tokenfan.serving")

#: The cyclic collector's thresholds once a server has started: the young generation every 10,000 allocations
#: of tracked objects instead of every 700, the older ones as often as before relative to it.
SERVING_GC_THRESHOLDS = (10_000, 10, 10)


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: the process's stop signals are ours to route."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def write_ready_file(path: str | os.PathLike[str] | None, url: str, **extra: Any) -> None:
    """Atomically publish that a server is ready at `url` (no reader ever sees a half-written file)."""
    if path is None:
        return
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), **extra}))
    tmp.replace(target)


def bound_url(sock: socket.socket, scheme: str) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def settle_collector() -> None:
    """Call once a server has started. What is loaded by then lives as long as the process, so the cyclic
    collector stops traversing it (``gc.freeze``), and it collects the young generation every 10,000
    allocations instead of every 700.

    A server's work makes many objects that die young or live for a while (a worker's per-token dicts; a
    relay's connections, tasks and the entries a storm of resumers reads back). With the default thresholds
    the collector ran about 20 times a second at 7,500 tokens/s and took 7% of a worker's CPU, under 1% with
    these (bench/worker.py at 150 generations); in a relay serving a storm of 100 resumes it took about a
    seventh of the CPU (docs/BENCHMARKS.md). `serve_asgi` settles every ASGI server of ours (the API, and the
    simulator, whose full collections of up to 20 ms each paused the streams it paces in tests and
    benchmarks)."""
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


class Lifelong:
    """The tasks a server runs for its whole life beside what it serves: a worker's flusher, lease heartbeat
    and cancellation listener, a relay's or API's presence claims. Each deals with Redis failures itself, so
    one that ends is a bug, and the process would go on serving without it, degraded without a word (a
    worker taking jobs it never flushes; a relay whose sessions look unwatched, their generations cancelled).
    So the end of one is logged (``background_task_ended``, with the task's name and error), `stop` stops the
    process as an operator's stop would, and `check`, once it has stopped, makes it exit with an error, for
    whatever runs it to start another."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop
        self.ended: list[str] = []

    def watch(self, task: asyncio.Task[Any]) -> None:
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return  # the process is stopping
        log.error("background_task_ended", task=task.get_name(), error=repr(task.exception()))
        self.ended.append(task.get_name())
        self.stop()

    def check(self) -> None:
        """Exit with an error if a watched task ended (call it once the process has stopped)."""
        if self.ended:
            raise SystemExit(f"stopped: {', '.join(self.ended)} ended, which it cannot run without")


def stop_this_process() -> None:
    """Stop as on SIGTERM, through the handler `install_stop_signals` put in place."""
    os.kill(os.getpid(), signal.SIGTERM)


def install_stop_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def serve_asgi(
    app: Any,
    *,
    host: str,
    port: int,
    ready_file: str | None = None,
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
    ready_info: Mapping[str, Any] | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve an ASGI app with uvicorn until SIGINT/SIGTERM; port 0 picks a free port. `ready_info` joins
    the URL in the ready file. Once it serves, the cyclic collector is settled (`settle_collector`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    config = uvicorn.Config(app, log_config=None, lifespan="on", **uvicorn_options)
    server = _Server(config)
    install_stop_signals(lambda: setattr(server, "should_exit", True))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # re-raise why start-up failed
            return
        await asyncio.sleep(0.01)
    settle_collector()
    url = bound_url(sock, "http")
    if on_ready is not None:
        result = on_ready(url)
        if result is not None:
            await result
    write_ready_file(ready_file, url, **(ready_info or {}))
    await task
