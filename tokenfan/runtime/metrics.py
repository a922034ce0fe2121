"""Metrics plumbing: one registry per process, exposed in Prometheus text format on a port of its own.

A component builds its instruments on the process's `Metrics` (`worker.metrics`, `api.live.metrics`,
`api.relay.metrics`, `api.http.metrics`) and `serve`s them when ``TOKENFAN_METRICS_PORT`` is set. The
exposition, and the standard process metrics (CPU, memory, open file descriptors, garbage collection), are
prometheus-client's. Two kinds of instrument:

* prometheus-client's `Counter`, `Gauge` and `Histogram`, for what happens per request, per generation,
  per connection or per Redis write: a lock and a few hundred nanoseconds each;
* `FastHistogram`, for what happens per token or per delivered batch: a bisect and a list increment, no
  lock (only the event loop's thread writes; the scrape, in the server's thread, reads a copy, and derives
  the count from the buckets so the two always agree). When metrics are off it is a `NullHistogram`, which
  does nothing, so a process without a metrics port pays nothing per token.

Names follow Prometheus' conventions (base units in the name, ``_total`` on counters). Labels never carry a
session or generation id: they are unbounded, and a scrape must stay small.
"""

from __future__ import annotations

import bisect
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = [
    "BYTES_BUCKETS",
    "COUNT_BUCKETS",
    "LATENCY_BUCKETS",
    "Counter",
    "FastHistogram",
    "Gauge",
    "Histogram",
    "Metrics",
    "NullHistogram",
]

#: Seconds, for what users feel while tokens stream: a millisecond (a frame leaving a relay) to a minute (a
#: first token behind a long queue or a slow model).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Things per batch (events per write, generations per write).
COUNT_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
#: Bytes per batch.
BYTES_BUCKETS: tuple[float, ...] = (256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304)


def _tokenfan_version() -> str:
    try:
        return version("tokenfan")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
        return "unknown"


class FastHistogram:
    """A histogram for hot paths: `observe` is a bisect and a list increment. Without labels."""

    __slots__ = ("_counts", "_sum", "bounds", "documentation", "name")

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (Prometheus' ``le``).
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds, total = self._counts, self.bounds, 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
            total += value
        self._sum += total

    @property
    def count(self) -> int:
        return sum(self._counts)

    def family(self) -> HistogramMetricFamily:
        counts, total = (
            list(self._counts),
            self._sum,
        )  # list(): one step under the GIL, whatever the loop does
        cumulative, running = [], 0
        for bound, count in zip([*self.bounds, float("inf")], counts, strict=True):
            running += count
            cumulative.append((_bound_label(bound), running))
        return HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=total)


class NullHistogram(FastHistogram):
    """A `FastHistogram` that records nothing: the hot paths of a process without a metrics port."""

    __slots__ = ()

    def observe(self, value: float) -> None:
        return None

    def observe_many(self, values: Iterable[float]) -> None:
        return None


def _bound_label(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


class _ReadAtScrape:
    """A collector of families made at scrape time: fast histograms, and counters read from elsewhere."""

    def __init__(self) -> None:
        self.histograms: list[FastHistogram] = []
        self.counters: list[tuple[str, str, Sequence[str], Callable[[], Mapping[Any, float]]]] = []

    def collect(self) -> Iterable[Metric]:
        for histogram in self.histograms:
            yield histogram.family()
        for name, documentation, labels, read in self.counters:
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for values, count in dict(read()).items():
                family.add_metric(list(values), count)
            yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None  # a scrape every few seconds is not worth a log line


class Metrics:
    """The metrics of one process. `enabled` says whether anything will read them: when it is false, the
    hot-path instruments (`fast_histogram`) record nothing, and `serve` is never called."""

    def __init__(self, component: str, *, enabled: bool) -> None:
        # A ``_created`` series per counter would double a scrape, for nothing we use.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.component = component
        self.enabled = enabled
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        info = Info(
            "tokenfan", "What this process is: its component and tokenfan's version.", registry=self.registry
        )
        info.info({"component": component, "version": _tokenfan_version()})
        self._scraped = _ReadAtScrape()
        self.registry.register(self._scraped)
        self._server: WSGIServer | None = None
        #: What was declared here, in order: (name as exposed, type, labels, documentation).
        self.catalog: list[tuple[str, str, tuple[str, ...], str]] = []

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        self.catalog.append((name, "counter", tuple(labels), documentation))
        return Counter(name, documentation, list(labels), registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        self.catalog.append((name, "gauge", tuple(labels), documentation))
        return Gauge(name, documentation, list(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        self.catalog.append((name, "histogram", tuple(labels), documentation))
        return Histogram(name, documentation, list(labels), registry=self.registry, buckets=list(buckets))

    def fast_histogram(
        self, name: str, documentation: str, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> FastHistogram:
        """A hot-path histogram (see the module's docstring); a `NullHistogram` when metrics are off."""
        self.catalog.append((name, "histogram", (), documentation))
        if not self.enabled:
            return NullHistogram(name, documentation, buckets)
        histogram = FastHistogram(name, documentation, buckets)
        self._scraped.histograms.append(histogram)
        return histogram

    def counts(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        read: Callable[[], Mapping[Any, float]],
    ) -> None:
        """A counter family whose values `read()` returns at each scrape, by label values: for counts kept
        by a floor that does not know this process's metrics (the store's Redis errors). `name` ends with
        ``_total``, as the exposition shows it."""
        self.catalog.append((name, "counter", tuple(labels), documentation))
        self._scraped.counters.append((name.removesuffix("_total"), documentation, labels, read))

    def exposition(self) -> bytes:
        """What ``GET /metrics`` answers, now."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> str:
        """Serve ``GET /metrics`` on `host`:`port` (0: any free port) from a thread of its own, so a scrape
        answers even while the event loop is busy; returns the URL. Other paths answer 404."""
        app = make_wsgi_app(self.registry)

        def only_metrics(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are at /metrics\n"]
            answer: Iterable[bytes] = app(environ, start_response)
            return answer

        server_class = type(
            "MetricsServer",
            (ThreadingWSGIServer,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True},
        )
        self._server = make_server(host, port, only_metrics, server_class, handler_class=_QuietHandler)
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        address: tuple[Any, ...] = self._server.socket.getsockname()
        shown = f"[{address[0]}]" if ":" in str(address[0]) else str(address[0])
        return f"http://{shown}:{address[1]}/metrics"

    def expose(self, host: str, port: int | None) -> dict[str, str]:
        """`serve` when `port` is set (``TOKENFAN_METRICS_PORT``): what the ready file says of it (``{}``
        when the process serves no metrics)."""
        return {} if port is None else {"metrics": self.serve(host, port)}

    def close(self) -> None:
        """Stop serving (the thread is a daemon: a process that just exits needs no call)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
