"""The metrics plumbing: hot-path histograms, counts read at scrape time, the endpoint, the setting."""

from __future__ import annotations

import httpx
import pytest

from tokenfan.cli.scrapes import parse_scrape
from tokenfan.runtime.metrics import FastHistogram, Metrics, NullHistogram
from tokenfan.runtime.settings import Settings, SettingsError


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return dict(parse_scrape("", metrics.exposition().decode(), 0.0).samples)


def test_a_fast_histogram_counts_a_value_on_a_bound_in_that_bound_and_exports_cumulative_buckets() -> None:
    metrics = Metrics("test", enabled=True)
    histogram = metrics.fast_histogram("tokenfan_test_seconds", "a test", buckets=(0.1, 1.0))
    assert isinstance(histogram, FastHistogram)
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    histogram.observe_many([0.2, 30.0])
    samples = scraped(metrics)
    assert samples[("tokenfan_test_seconds_bucket", (("le", "0.1"),))] == 2
    assert samples[("tokenfan_test_seconds_bucket", (("le", "1.0"),))] == 5
    assert samples[("tokenfan_test_seconds_bucket", (("le", "+Inf"),))] == 7
    assert samples[("tokenfan_test_seconds_count", ())] == 7 == histogram.count
    assert samples[("tokenfan_test_seconds_sum", ())] == pytest.approx(38.85)


def test_without_a_metrics_port_hot_path_histograms_record_nothing() -> None:
    metrics = Metrics("test", enabled=False)
    histogram = metrics.fast_histogram("tokenfan_test_seconds", "a test")
    assert type(histogram) is NullHistogram
    histogram.observe(1.0)
    histogram.observe_many([1.0, 2.0])
    assert histogram.count == 0
    assert not any(name.startswith("tokenfan_test") for name, _ in scraped(metrics))


def test_counts_read_at_scrape_time_are_counters_with_their_labels() -> None:
    metrics = Metrics("test", enabled=True)
    seen = {("write", "ConnectionError"): 2}
    metrics.counts("tokenfan_test_errors_total", "errors", ("operation", "error"), lambda: seen)
    labels = (("error", "ConnectionError"), ("operation", "write"))
    assert scraped(metrics)[("tokenfan_test_errors_total", labels)] == 2
    seen[("write", "ConnectionError")] = 5
    assert scraped(metrics)[("tokenfan_test_errors_total", labels)] == 5
    assert "# TYPE tokenfan_test_errors_total counter" in metrics.exposition().decode()


async def test_the_endpoint_serves_prometheus_text_at_metrics_only() -> None:
    metrics = Metrics("relay", enabled=True)
    url = metrics.expose("127.0.0.1", 0)["metrics"]
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            scrape = parse_scrape(url, response.text, 0.0)
            assert scrape.component == "relay"
            assert scrape.value("process_resident_memory_bytes") > 0
            assert (await client.get(url.removesuffix("/metrics") + "/")).status_code == 404
    finally:
        metrics.close()
    assert Metrics("relay", enabled=False).expose("127.0.0.1", None) == {}


def test_the_metrics_port_is_a_port() -> None:
    assert Settings.from_env({}).metrics_port is None
    assert Settings.from_env({"TOKENFAN_METRICS_PORT": "9100"}).metrics_port == 9100
    assert Settings.from_env({"TOKENFAN_METRICS_PORT": "9100"}, metrics_port=0).metrics_port == 0
    with pytest.raises(SettingsError, match="TOKENFAN_METRICS_PORT"):
        Settings.from_env({"TOKENFAN_METRICS_PORT": "70000"})
