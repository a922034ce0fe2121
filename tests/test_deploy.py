"""The dashboard and the alert rules name only what tokenfan exports (deploy/check.py, run by ./dev lint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.check import DEPLOY, check, exported_names, metric_names, with_metrics_table


def test_the_shipped_dashboard_and_alerts_pass() -> None:
    assert check(DEPLOY / "prometheus" / "alerts.yml", DEPLOY / "grafana" / "tokenfan.json") == []


def test_a_name_the_code_does_not_export_fails(tmp_path: Path) -> None:
    dashboard = tmp_path / "d.json"
    dashboard.write_text(
        json.dumps({"panels": [{"title": "t", "targets": [{"expr": "rate(tokenfan_nope_total[5m])"}]}]})
    )
    problems = check(DEPLOY / "prometheus" / "alerts.yml", dashboard)
    assert problems == ["d.json: panel 't': not exported by tokenfan: tokenfan_nope_total"]


@pytest.mark.parametrize(
    ("expression", "names"),
    [
        ('sum by (le, job) (rate(a_bucket{x="y"}[$__rate_interval]))', {"a_bucket"}),
        ("a_total / on (instance) group_left () b_info{c=~'d|e'} > 0", {"a_total", "b_info"}),
        ("histogram_quantile(0.9, rate(a_bucket[5m] offset 15m)) and up == 0", {"a_bucket", "up"}),
    ],
)
def test_names_leave_functions_labels_keywords_and_durations_out(expression: str, names: set[str]) -> None:
    assert metric_names(expression) == names


def test_an_unbalanced_expression_is_refused() -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        metric_names("sum(rate(a_total[5m])")


def test_every_instrument_family_is_known() -> None:
    names = exported_names()
    assert {"tokenfan_worker_time_to_first_token_seconds_bucket", "tokenfan_live_subscriptions"} <= names
    assert {"tokenfan_redis_errors_total", "tokenfan_info", "process_open_fds"} <= names


def test_operations_doc_holds_the_current_metrics_table() -> None:
    text = (DEPLOY.parent / "docs" / "OPERATIONS.md").read_text()
    assert with_metrics_table(text) == text, "docs/OPERATIONS.md is stale: run ./dev docs"
