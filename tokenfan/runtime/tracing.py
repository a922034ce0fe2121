"""Tracing with OpenTelemetry: off by default, on with the standard ``OTEL_*`` environment variables.

A process asks `tracer_from_env` once, at start-up, and passes what it gets explicitly: None when tracing is
off (instrumented code then skips every span: one ``is None`` test), else a tracer of the OpenTelemetry SDK
whose spans go, in batches, to the exporter ``OTEL_TRACES_EXPORTER`` names:

* ``otlp`` (the default once tracing is asked for): OTLP over HTTP/protobuf, configured as usual by
  ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``...;
* ``console``: spans printed to stdout (a development aid);
* any other name: the exporter an installed package registers under that name (entry points of
  ``opentelemetry_traces_exporter``), as the SDK's own configuration does.

Tracing is asked for when ``OTEL_TRACES_EXPORTER`` names an exporter (not ``none``) or an OTLP endpoint is
set, and ``OTEL_SDK_DISABLED`` is not ``true``. ``OTEL_SERVICE_NAME`` (default ``tokenfan-<component>``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and the batch processor's ``OTEL_BSP_*`` apply as the SDK
reads them. The SDK and the OTLP exporter come with the ``tracing`` extra (``pip install 'tokenfan[tracing]'``);
without them, a request for tracing is logged and ignored.

A trace context crosses processes as a W3C ``traceparent`` (and ``tracestate``) in a plain dict
(`inject`, `extract`): in HTTP headers on the way in, inside the stored request on the way to a worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Final

import structlog
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

__all__ = ["TRACE_CONTEXT", "extract", "inject", "tracer_from_env", "tracing_requested"]

log = structlog.get_logger("tokenfan.tracing")

#: The member of a stored generation request that carries the trace context of the API request that made it
#: (set by the API, read by the worker that runs it; a client cannot send it: the request schema refuses it).
TRACE_CONTEXT: Final = "trace_context"


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables in `environ` ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def tracer_from_env(component: str, environ: Mapping[str, str] | None = None) -> Tracer | None:
    """This process's tracer, or None when tracing is off (see the module's docstring). Raises ValueError
    for an exporter name nothing provides."""
    source = os.environ if environ is None else environ
    if not tracing_requested(source):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing_unavailable", detail="OTEL_* asks for traces: install tokenfan[tracing]")
        return None
    resource = Resource.create({"tokenfan.component": component})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": f"tokenfan-{component}"}))
    provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER itself
    for name in _exporter_names(source):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, source)))
    return provider.get_tracer("tokenfan")


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    return [name for name in names if name != "none"] or ["otlp"]


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if name in ("otlp", "otlp_proto_http") and protocol in (None, "", "http/protobuf"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*
    registered = "otlp_proto_grpc" if name == "otlp" and protocol == "grpc" else name
    found = entry_points(group="opentelemetry_traces_exporter", name=registered)
    if not found:
        raise ValueError(f"OTEL_TRACES_EXPORTER: no installed exporter is called {registered!r}")
    return next(iter(found)).load()()


def inject(context: Context | None = None) -> dict[str, str]:
    """The trace context (the current one, or `context`) as W3C headers: ``{}`` outside any span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The context `carrier` (from `inject`, or HTTP headers) names; an empty one for None."""
    return propagate.extract(dict(carrier or {}))
