"""The simulator's HTTP face: a Starlette app that only validates, paces and sends what `reply` planned."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncGenerator, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tokenfan.cli.simulator.options import Directive, SimulatorConfig, parse_directive, validate_body
from tokenfan.cli.simulator.reply import Halt, Step, completion, plan_reply, stream_steps
from tokenfan.runtime.serving import serve_asgi

__all__ = ["create_app", "serve"]

_DONE_FRAME = b"data: [DONE]\n\n"


@dataclass
class _Stats:
    requests: int = 0  # chat.completions requests, whatever became of them
    streams_started: int = 0
    streams_completed: int = 0  # sent [DONE]
    streams_disconnected: int = 0  # the client left first
    streams_aborted: int = 0  # drop_after / error_after ended it on purpose
    streams_open: int = 0


class _DroppedError(Exception):
    """drop_after struck: the body must end without its terminating chunk."""


async def _frames(steps: Iterable[Step], rate: float) -> AsyncGenerator[bytes, None]:
    loop = asyncio.get_running_loop()
    start, paced = loop.time(), 0
    for step in steps:
        if isinstance(step, Halt):
            if step.kind == "stall":
                await loop.create_future()  # never resolves: only the client leaving ends a stall
            raise _DroppedError
        if step.paced:
            # An absolute schedule, so per-token overhead does not accumulate into drift; at rate 0 the
            # sleep(0) still yields, so one fast stream cannot starve the others.
            await asyncio.sleep(max(0.0, start + paced / rate - loop.time()) if rate > 0 else 0)
            paced += 1
        yield _DONE_FRAME if step.data is None else b"data: " + _json(step.data) + b"\n\n"


def _json(data: dict[str, Any]) -> bytes:
    """A chunk as UTF-8 JSON. A lone surrogate, which UTF-8 cannot carry, goes out as a JSON escape, as a
    provider slicing its text by UTF-16 code units sends it."""
    try:
        return json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(data).encode()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_of(pump: Coroutine[Any, Any, str], watch: Coroutine[Any, Any, None]) -> str:
    """The pump's outcome, or "disconnected" if the watch ended first (the pump is then cancelled)."""
    pump_task, watch_task = asyncio.ensure_future(pump), asyncio.ensure_future(watch)
    try:
        await asyncio.wait((pump_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump_task, watch_task):
            task.cancel()
        await asyncio.gather(pump_task, watch_task, return_exceptions=True)
    return "disconnected" if pump_task.cancelled() else pump_task.result()


class _EventStream(StreamingResponse):
    """An SSE response that notices a departed client at once, even between tokens or stalled."""

    def __init__(self, steps: Iterable[Step], *, rate: float, stats: _Stats) -> None:
        self.frames = _frames(steps, rate)
        super().__init__(self.frames, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.streams_started += 1
        self.stats.streams_open += 1
        outcome = "aborted"
        try:
            # uvicorn's send() silently discards writes once the client is gone: only receive() tells.
            outcome = await _first_of(self._pump(send), _until_disconnect(receive))
        finally:
            self.stats.streams_open -= 1
            counter = f"streams_{outcome}"
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        # After a drop we return without the final empty body: uvicorn then closes the socket mid-body.

    async def _pump(self, send: Send) -> str:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        frame = b""
        try:
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        except _DroppedError:
            return "aborted"
        finally:
            await self.frames.aclose()  # a cancel landing in send() would leave the generator suspended
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return "completed" if frame == _DONE_FRAME else "aborted"


def _error(
    status: int, message: str, headers: Mapping[str, str] | None = None, *, code: str | None = None
) -> JSONResponse:
    """An error in OpenAI's format, which the openai client maps to its exception classes by status."""
    known = {401: ("invalid_request_error", "invalid_api_key"), 429: ("requests", "rate_limit_exceeded")}
    kind, known_code = known.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    body = {"error": {"message": message, "type": kind, "param": None, "code": code or known_code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = _Stats()
        self.fault_counts: dict[str, int] = {}  # requests seen per fault key, for `times`

    def _unauthorized(self, request: Request) -> Response | None:
        if self.config.api_key is None:
            return None
        presented = request.headers.get("authorization", "")
        if secrets.compare_digest(presented.encode(), f"Bearer {self.config.api_key}".encode()):
            return None
        return _error(401, "Incorrect API key provided.")

    def _armed(self, directive: Directive) -> Directive:
        if directive.times is None:
            return directive
        seen = self.fault_counts[directive.fault_key] = self.fault_counts.get(directive.fault_key, 0) + 1
        return directive if seen <= directive.times else directive.without_faults()

    async def chat_completions(self, request: Request) -> Response:
        self.stats.requests += 1
        if denied := self._unauthorized(request):
            return denied
        try:
            body = validate_body(json.loads(await request.body()))
            directive = self._armed(parse_directive(body))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
            return _error(400, str(exc))
        if self.config.models is not None and body["model"] not in self.config.models:
            message = f"The model `{body['model']}` does not exist or you do not have access to it."
            return _error(404, message, code="model_not_found")
        if directive.status is not None:
            retry = {} if directive.retry_after is None else {"retry-after": f"{directive.retry_after:g}"}
            return _error(directive.status, f"simulated HTTP {directive.status}", retry)
        reply, created, model = plan_reply(body, directive, self.config), int(time.time()), body["model"]
        if not body.get("stream"):
            return Response(
                _json(completion(reply, model=model, created=created)), media_type="application/json"
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        steps = stream_steps(reply, directive, model=model, created=created, include_usage=include_usage)
        rate = self.config.tokens_per_second if directive.rate is None else directive.rate
        return _EventStream(steps, rate=rate, stats=self.stats)

    async def models(self, request: Request) -> Response:
        if denied := self._unauthorized(request):
            return denied
        names = self.config.models if self.config.models is not None else (self.config.model,)
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "tokenfan"} for name in names]
        return JSONResponse({"object": "list", "data": models})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def stats_view(self, request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(self.stats))


def create_app(config: SimulatorConfig) -> Starlette:
    """The simulator as an ASGI app; all its state (counters, fault budgets) belongs to this one app."""
    sim = _Simulator(config)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", sim.chat_completions, methods=["POST"]),
            Route("/v1/models", sim.models, methods=["GET"]),
            Route("/healthz", sim.healthz, methods=["GET"]),
            Route("/_sim/stats", sim.stats_view, methods=["GET"]),
        ]
    )


async def serve(config: SimulatorConfig, *, host: str, port: int, ready_file: str | None) -> None:
    """Serve the simulator until SIGINT/SIGTERM; port 0 picks a free port, announced in `ready_file`."""
    # A stalled stream never ends by itself, so shutdown must not wait on open streams forever.
    await serve_asgi(
        create_app(config), host=host, port=port, ready_file=ready_file, timeout_graceful_shutdown=2
    )
