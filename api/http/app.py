"""The request API application: its services, middleware and lifespan (routes are in `api.http.routes`)."""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from opentelemetry.trace import SpanKind, Tracer
from starlette.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.browser import browser_router
from api.http.ds.routes import router as ds_router
from api.http.ds.wire import DS_REQUEST_HEADERS, DS_RESPONSE_HEADERS
from api.http.errors import install_error_handlers
from api.http.limits import BodySizeLimit
from api.http.metrics import HttpMetrics, route_of
from api.http.openai.routes import router as openai_router
from api.http.routes import router
from api.http.security import caller
from api.live.feed import LiveBus
from tokenfan.runtime.auth import Authenticator
from tokenfan.runtime.metrics import Metrics
from tokenfan.runtime.serving import Lifelong
from tokenfan.runtime.settings import Settings
from tokenfan.runtime.tracing import extract
from tokenfan.store import Store
from tokenfan.store.boundary import expose_redis_errors
from tokenfan.store.jobs import JobQueue, create_queue

__all__ = ["Services", "create_app"]

log = structlog.get_logger("tokenfan.api")


@dataclass
class Services:
    settings: Settings
    auth: Authenticator
    store: Store
    queue: JobQueue
    bus: LiveBus
    #: Open SSE streams per client address, in this process (capped by sse_max_streams_per_address).
    sse_streams: Counter[str] = field(default_factory=Counter)
    metrics: HttpMetrics = field(default_factory=lambda: HttpMetrics(Metrics("api", enabled=False)))
    #: The process's tracer (None: tracing is off); a generation's trace context goes into its stored request.
    tracer: Tracer | None = None


class AccessLog:
    """One structured log event per request (plain ASGI: it must not buffer streamed responses), its count
    by route and status, and its span when tracing is on. The query string is left out: it may hold a token."""

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics, tracer: Tracer | None) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.tracer is None:
            await self._logged(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        with self.tracer.start_as_current_span(
            scope["method"], context=extract(headers), kind=SpanKind.SERVER
        ) as span:
            await self._logged(scope, receive, send)
            route = route_of(scope)
            span.update_name(f"{scope['method']} {route}")  # the template, known once routed
            span.set_attributes({"http.request.method": scope["method"], "http.route": route})

    async def _logged(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.answered(scope, status)
            log.info(
                "http_request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    tracer: Tracer | None = None,
    lifelong: Lifelong | None = None,
) -> FastAPI:
    """The ASGI app, its instruments on `metrics` and its spans on `tracer` (None: no tracing); `lifelong`
    watches the tasks it runs for the process's life (its server stops if one ends). Raises SettingsError
    when security is not configured (see docs/SECURITY.md); Redis and the queue are opened by its lifespan,
    so it can be built without I/O."""
    metrics = metrics or Metrics("api", enabled=False)
    expose_redis_errors(metrics)
    http_metrics = HttpMetrics(metrics)
    auth = Authenticator.from_settings(settings)
    if settings.insecure_dev_mode:
        log.warning("insecure_dev_mode", detail="every endpoint is open to anyone, from any origin")
    # The schema and the docs page need a credential too, unless in development mode.
    open_docs = settings.insecure_dev_mode
    app = FastAPI(
        title="tokenfan request API",
        version="1",
        lifespan=functools.partial(
            _lifespan,
            settings=settings,
            auth=auth,
            metrics=metrics,
            http_metrics=http_metrics,
            tracer=tracer,
            lifelong=lifelong,
        ),
        docs_url="/docs" if open_docs else None,
        openapi_url="/openapi.json" if open_docs else None,
    )
    app.include_router(router)
    app.include_router(browser_router)  # the client module and the demo page: open, they hold no data
    app.include_router(openai_router)
    _parameters_are_strings_or_absent(app)
    app.include_router(ds_router)  # Durable Streams: /ds/
    if not open_docs:
        _serve_docs_to_callers(app)
    install_error_handlers(app)
    _add_middleware(app, settings)
    app.add_middleware(AccessLog, metrics=http_metrics, tracer=tracer)
    return app


@asynccontextmanager
async def _lifespan(
    app: FastAPI,
    *,
    settings: Settings,
    auth: Authenticator,
    metrics: Metrics,
    http_metrics: HttpMetrics,
    tracer: Tracer | None,
    lifelong: Lifelong | None,
) -> AsyncIterator[None]:
    store = Store.from_settings(settings)
    queue = await create_queue(settings.queue_url)
    bus = LiveBus.from_settings(store, settings, metrics)
    bus.start(lifelong.watch if lifelong is not None else None)
    services = Services(settings, auth, store, queue, bus, metrics=http_metrics, tracer=tracer)
    http_metrics.count_streams(services.sse_streams)
    app.state.services = services
    try:
        yield
    finally:
        await bus.close()
        await queue.aclose()
        await store.close()


def _parameters_are_strings_or_absent(app: FastAPI) -> None:
    """An optional header or query parameter is a string or absent: FastAPI's schema says "or null", which
    a client can only send as the text "null" (a malformed offset, a wrong key). The schema drops that
    branch, so that it allows exactly what validation does."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    for parameter in operation.get("parameters", ()):
                        _drop_null(parameter.get("schema", {}))
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_null(schema: dict[str, Any]) -> None:
    branches = schema.get("anyOf")
    if isinstance(branches, list) and {"type": "null"} in branches:
        kept = [branch for branch in branches if branch != {"type": "null"}]
        del schema["anyOf"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept


def _serve_docs_to_callers(app: FastAPI) -> None:
    """The OpenAPI schema and its docs page, for callers with a credential."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(caller)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(caller)])
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    origins = ["*"] if settings.insecure_dev_mode and not settings.origins else settings.origins
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "HEAD", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Last-Event-ID",
                "X-Tokenfan-Session",
                *DS_REQUEST_HEADERS,
            ],
            expose_headers=[
                "Location",
                "Idempotent-Replayed",
                "Retry-After",
                "X-Tokenfan-Session",
                "X-Tokenfan-Generation",
                *DS_RESPONSE_HEADERS,
            ],
            max_age=600,
        )
