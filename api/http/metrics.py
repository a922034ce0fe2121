"""What the request API measures besides the live engine (`api.live.metrics`): requests by route and status,
the latency of accepting and enqueueing a generation, open event streams, requests refused by a limit."""

from __future__ import annotations

from collections import Counter

from starlette.types import Scope

from tokenfan.runtime.metrics import Metrics

__all__ = ["HttpMetrics", "route_of"]

#: The `route` label of a request that matched no route (its raw path is never a label: it is unbounded).
UNMATCHED = "unmatched"


def route_of(scope: Scope) -> str:
    """The route template that served a request (``/v1/sessions/{session_id}/events``), once routed."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class HttpMetrics:
    """The request API's own instruments in one process."""

    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "tokenfan_api_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
        )
        self.rate_limited = metrics.counter(
            "tokenfan_api_rate_limited_requests_total",
            "Requests refused with 429: over a key's generation rate, or over an address's open streams.",
            ["route"],
        )
        self.enqueue = metrics.histogram(
            "tokenfan_api_enqueue_seconds",
            "Time to accept a generation and enqueue its job (every door: native, chat completions, Responses).",
        )
        self.streams = metrics.gauge(
            "tokenfan_api_sse_streams",
            "Server-sent event streams open now (native SSE and the front door's).",
        )

    def count_streams(self, streams: Counter[str]) -> None:
        """Read the open streams per address (`Services.sse_streams`) at each scrape."""
        # list() copies the values in one step under the GIL: the loop may change the counter meanwhile.
        self.streams.set_function(lambda: sum(list(streams.values())))

    def answered(self, scope: Scope, status: int) -> None:
        route = route_of(scope)
        self.requests.labels(route, scope["method"], str(status)).inc()
        if status == 429:
            self.rate_limited.labels(route).inc()
