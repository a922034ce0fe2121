"""What ``tokenfan top`` makes of two scrapes of each process: rates, percentiles, gauges. Pure: no I/O.

A `Scrape` is one process's metrics at one instant. A `Window` compares the latest scrape of every process
with the one before it: counters and histogram buckets become increases over the window (a process that
restarted in between starts again from zero), gauges are read as they are now. Processes of one component
(two relays, ten workers) are added up.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Scrape", "Window", "histogram_quantile", "parse_scrape"]

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]

#: Sample names that only ever grow (counters, and a histogram's buckets, count and sum).
_GROWING = ("_total", "_bucket", "_count", "_sum")


@dataclass(frozen=True)
class Scrape:
    """One process's metrics at one instant (`at`: seconds, on a monotonic clock)."""

    url: str
    at: float
    samples: Mapping[Key, float]
    component: str = "unknown"

    def value(self, name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in self.samples.items() if n == name and _matches(ls, labels))


def parse_scrape(url: str, text: str, at: float) -> Scrape:
    """A scrape from Prometheus' text format; its component is what ``tokenfan_info`` says."""
    samples: dict[Key, float] = {}
    component = "unknown"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
            if sample.name == "tokenfan_info":
                component = sample.labels.get("component", component)
    return Scrape(url, at, samples, component)


def _matches(labels: Labels, wanted: Mapping[str, str]) -> bool:
    present = dict(labels)
    return all(present.get(name) == value for name, value in wanted.items())


def _increase(now: float, before: float | None) -> float:
    if before is None or now < before:  # first sight, or the process restarted: it counts from zero
        return now
    return now - before


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The `q`-quantile of a histogram given as (upper bound, cumulative count) pairs, interpolated within
    its bucket as Prometheus' ``histogram_quantile`` does; None without observations. A quantile in the
    +Inf bucket is the highest finite bound."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound  # pragma: no cover - the last bucket holds every observation


@dataclass
class Window:
    """The latest scrape of each process, against the one before it."""

    latest: list[Scrape]
    previous: Mapping[str, Scrape] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        spans = [s.at - self.previous[s.url].at for s in self.latest if s.url in self.previous]
        return max(spans, default=0.0)

    def processes(self, component: str) -> list[Scrape]:
        return [scrape for scrape in self.latest if scrape.component == component]

    def increase(self, component: str, name: str, **labels: str) -> float:
        """How much a counter (or histogram series) of `component`'s processes grew over the window."""
        total = 0.0
        for scrape in self.processes(component):
            before = self.previous.get(scrape.url)
            for (n, ls), value in scrape.samples.items():
                if n == name and _matches(ls, labels):
                    total += _increase(value, before.samples.get((n, ls)) if before else None)
        return total

    def rate(self, component: str, name: str, **labels: str) -> float | None:
        """Per second over the window; None before there are two scrapes."""
        seconds = self.seconds
        return self.increase(component, name, **labels) / seconds if seconds > 0 else None

    def rates_by(self, component: str, name: str, label: str) -> dict[str, float]:
        """`rate` of each value of `label`, the largest first (values that did not grow are left out)."""
        values = {
            dict(ls).get(label) for s in self.processes(component) for (n, ls) in s.samples if n == name
        }
        rates = {value: self.rate(component, name, **{label: value}) for value in values if value is not None}
        shown = {value: rate for value, rate in rates.items() if rate}
        return dict(sorted(shown.items(), key=lambda item: -item[1]))

    def gauge(self, component: str, name: str, **labels: str) -> float:
        """A gauge's value now, added up over `component`'s processes."""
        return sum(scrape.value(name, **labels) for scrape in self.processes(component))

    def quantile(self, component: str, name: str, q: float) -> float | None:
        """The `q`-quantile of histogram `name` over the window (over each process's life before there are
        two scrapes)."""
        buckets: dict[float, float] = defaultdict(float)
        for scrape in self.processes(component):
            before = self.previous.get(scrape.url)
            for (n, ls), value in scrape.samples.items():
                if n == f"{name}_bucket":
                    bound = float(dict(ls)["le"])
                    buckets[bound] += _increase(value, before.samples.get((n, ls)) if before else None)
        return histogram_quantile(q, buckets.items())
