"""A generation's spans on the worker's side, continuing the trace its API request began.

The API puts its trace context in the stored request (`TRACE_CONTEXT`); the attempt that takes the
generation reads it back and adds, under it:

* ``tokenfan.queue``: from the job entering the queue to the attempt's start (first attempts);
* ``tokenfan.generation``: the attempt, from its start to its terminal event being durable;
* under it, ``tokenfan.upstream`` for each request to the upstream (retries are their own spans), and
  ``tokenfan.write`` for the writes to Redis that carried its events: the first `WRITE_SPANS` of them and
  the last (a long generation writes hundreds of times; the rest are counted on the generation's span).

None of this exists when tracing is off: the job's tracer is None, and so is every stream's trace.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from tokenfan.runtime.tracing import TRACE_CONTEXT, extract
from tokenfan.store import StartOutcome, StartResult

__all__ = ["WRITE_SPANS", "AttemptTrace", "attempt_trace"]
#: Writes of one attempt recorded as spans of their own, besides the last one.
WRITE_SPANS: Final = 32


class AttemptTrace:
    """The spans of one attempt; `span` is the attempt's own (``tokenfan.generation``)."""

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self.tracer = tracer
        self.span = span
        self.writes = 0
        self.events = 0

    @contextlib.contextmanager
    def upstream(self, model: str) -> Iterator[Span]:
        """A span around one request to the upstream, until its stream ends."""
        with self.tracer.start_as_current_span(
            "tokenfan.upstream",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": model},
        ) as span:
            yield span

    def wrote(self, started_ns: int, ended_ns: int, events: int, *, final: bool) -> None:
        """A write to Redis carried `events` of this attempt's events, from `started_ns` to `ended_ns`."""
        self.writes += 1
        self.events += events
        if self.writes > WRITE_SPANS and not final:
            return
        span = self.tracer.start_span(
            "tokenfan.write",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            start_time=started_ns,
            attributes={"db.system": "redis", "tokenfan.events": events, "tokenfan.final": final},
        )
        span.end(end_time=ended_ns)

    def failed(self, error_type: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, error_type))
        self.span.set_attribute("error.type", error_type)


@contextlib.contextmanager
def attempt_trace(
    tracer: Tracer | None,
    session_id: str,
    generation_id: str,
    start: StartResult,
    enqueued_at: float | None,
) -> Iterator[AttemptTrace | None]:
    """The spans of an attempt that starts now (None when tracing is off), ended when the block is left."""
    if tracer is None:
        yield None
        return
    carrier: Any = (start.request or {}).get(TRACE_CONTEXT)
    parent = extract(carrier if isinstance(carrier, dict) else None)
    now = time.time_ns()
    if enqueued_at is not None and start.outcome is StartOutcome.STARTED:
        queued = tracer.start_span(
            "tokenfan.queue", context=parent, start_time=min(now, int(enqueued_at * 1e9))
        )
        queued.end(end_time=now)
    attributes: dict[str, str | int] = {
        "tokenfan.session_id": session_id,
        "tokenfan.generation_id": generation_id,
        "tokenfan.attempt": start.attempt,
    }
    with tracer.start_as_current_span(
        "tokenfan.generation", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        attempt = AttemptTrace(tracer, span)
        try:
            yield attempt
        finally:
            span.set_attribute("tokenfan.writes", attempt.writes)
            span.set_attribute("tokenfan.events", attempt.events)
