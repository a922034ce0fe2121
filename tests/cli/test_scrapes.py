"""What `tokenfan top` computes from two scrapes: increases across restarts, rates, quantiles."""

from __future__ import annotations

import pytest

from tokenfan.cli.scrapes import Scrape, Window, histogram_quantile, parse_scrape

WORKER = """\
# TYPE tokenfan_info gauge
tokenfan_info{{component="worker",version="0"}} 1.0
# TYPE tokenfan_worker_tokens_total counter
tokenfan_worker_tokens_total {tokens}
# TYPE tokenfan_worker_generations_running gauge
tokenfan_worker_generations_running {running}
# TYPE tokenfan_worker_time_to_first_token_seconds histogram
tokenfan_worker_time_to_first_token_seconds_bucket{{le="0.1"}} {fast}
tokenfan_worker_time_to_first_token_seconds_bucket{{le="1.0"}} {all}
tokenfan_worker_time_to_first_token_seconds_bucket{{le="+Inf"}} {all}
tokenfan_worker_time_to_first_token_seconds_count {all}
tokenfan_worker_time_to_first_token_seconds_sum 1.0
"""


def worker(url: str, at: float, *, tokens: int, running: int = 0, fast: int = 0, all: int = 0) -> Scrape:
    text = WORKER.format(tokens=tokens, running=running, fast=fast, all=all)
    return parse_scrape(url, text, at)


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.5, 0.1), (0.25, 0.05), (0.75, 0.55), (1.0, 1.0)],
)
def test_quantiles_interpolate_within_their_bucket_as_prometheus_does(q: float, expected: float) -> None:
    buckets = [(0.1, 10.0), (1.0, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


def test_a_quantile_past_the_last_bound_is_that_bound_and_none_without_observations() -> None:
    assert histogram_quantile(0.99, [(0.1, 1.0), (1.0, 1.0), (float("inf"), 10.0)]) == 1.0
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_processes_of_a_component_add_up_and_a_restarted_one_counts_from_zero() -> None:
    before = [worker("a", 0.0, tokens=100, fast=1, all=2), worker("b", 0.0, tokens=1_000)]
    after = [
        worker("a", 2.0, tokens=160, running=3, fast=5, all=6),  # +60 tokens, 4 fast first tokens
        worker("b", 2.0, tokens=40, running=1, fast=0, all=4),  # restarted: 40 since, 4 slow ones
    ]
    window = Window(after, {scrape.url: scrape for scrape in before})
    assert window.seconds == 2.0
    assert window.increase("worker", "tokenfan_worker_tokens_total") == 100
    assert window.rate("worker", "tokenfan_worker_tokens_total") == 50
    assert window.gauge("worker", "tokenfan_worker_generations_running") == 4
    # 8 first tokens in the window: 4 under 0.1 s, 4 between 0.1 and 1 s
    assert window.quantile("worker", "tokenfan_worker_time_to_first_token_seconds", 0.5) == pytest.approx(0.1)
    assert window.rate("relay", "tokenfan_live_frames_sent_total") == 0


def test_with_one_scrape_there_is_no_rate_yet() -> None:
    window = Window([worker("a", 5.0, tokens=10)])
    assert window.rate("worker", "tokenfan_worker_tokens_total") is None
    assert window.processes("worker")[0].component == "worker"
