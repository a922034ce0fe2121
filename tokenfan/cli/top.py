"""``tokenfan top``: a running deployment on one screen, refreshed every few seconds.

It reads each process's ``GET /metrics`` (the addresses `tokenfan up` prints, or your own processes') and
shows, per component, live rates and latency percentiles over the last interval; and, from Redis (the
presence claims of ``tf:{S}:watchers``, never from metric labels), the sessions with the most subscribers.
On a terminal each frame replaces the last; otherwise frames follow each other (``--iterations`` bounds
them, for a script or a test).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence

import httpx

from tokenfan.cli.scrapes import Scrape, Window, parse_scrape
from tokenfan.contract.errors import StorageUnavailable
from tokenfan.runtime.settings import Settings
from tokenfan.store import Store

__all__ = ["render", "top"]

_CLEAR = "\x1b[H\x1b[2J"
_QUANTILES = ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}/s"


def _latencies(window: Window, component: str, name: str) -> str:
    return "  ".join(f"{label} {_seconds(window.quantile(component, name, q))}" for q, label in _QUANTILES)


def _by(rates: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:,.1f}/s" for key, value in rates.items()) or "none"


def _processes(window: Window) -> list[str]:
    lines = ["PROCESS    CPU      RSS       FDS   METRICS"]
    for scrape in sorted(window.latest, key=lambda s: (s.component, s.url)):
        before = window.previous.get(scrape.url)
        cpu = "-"
        if before is not None and scrape.at > before.at:
            used = scrape.value("process_cpu_seconds_total") - before.value("process_cpu_seconds_total")
            cpu = f"{100 * used / (scrape.at - before.at):.0f}%"
        rss = scrape.value("process_resident_memory_bytes") / 2**20
        fds = scrape.value("process_open_fds")
        lines.append(f"{scrape.component:<10} {cpu:>5} {rss:>6.0f} MiB {fds:>6.0f}   {scrape.url}")
    return lines


def _workers(window: Window) -> list[str]:
    w = "worker"
    finished = "tokenfan_worker_generations_finished_total"
    return [
        f"WORKERS    running {window.gauge(w, 'tokenfan_worker_generations_running'):.0f}   "
        f"started {_per_second(window.rate(w, 'tokenfan_worker_generations_started_total'))}   "
        f"completed {_per_second(window.rate(w, finished, outcome='completed'))}   "
        f"failed {_per_second(window.rate(w, finished, outcome='failed'))}   "
        f"cancelled {_per_second(window.rate(w, finished, outcome='cancelled'))}",
        f"           tokens {_per_second(window.rate(w, 'tokenfan_worker_tokens_total'))}   "
        f"restarts {_per_second(window.rate(w, 'tokenfan_worker_generation_restarts_total'))}   "
        f"upstream retries: {_by(window.rates_by(w, 'tokenfan_worker_upstream_retries_total', 'cause'))}",
        f"           failures: {_by(_failures(window))}",
        f"           first token   {_latencies(window, w, 'tokenfan_worker_time_to_first_token_seconds')}",
        f"           token gap     {_latencies(window, w, 'tokenfan_worker_inter_token_gap_seconds')}",
        f"           queue wait    {_latencies(window, w, 'tokenfan_worker_queue_wait_seconds')}",
        f"           Redis write   {_latencies(window, w, 'tokenfan_worker_redis_write_seconds')}",
    ]


def _failures(window: Window) -> dict[str, float]:
    """Failed generations per second, by error type."""
    name = "tokenfan_worker_generations_finished_total"
    rates = {
        r: window.rate("worker", name, outcome="failed", reason=r)
        for r in window.rates_by("worker", name, "reason")
    }
    return {reason: rate for reason, rate in rates.items() if rate}


def _relays(window: Window) -> list[str]:
    lines = []
    for component, title in (("relay", "RELAYS"), ("api", "API (SSE)")):
        if not window.processes(component):
            continue
        subscriptions = ", ".join(
            f"{transport} {window.gauge(component, 'tokenfan_live_subscriptions', transport=transport):.0f}"
            for transport in ("websocket", "sse", "openai")
        )
        lines += [
            f"{title:<10} subscriptions {subscriptions}   sessions read {window.gauge(component, 'tokenfan_live_feeds'):.0f}"
            + (
                f"   connections {window.gauge(component, 'tokenfan_relay_connections'):.0f}"
                if component == "relay"
                else ""
            ),
            f"           frames {_per_second(window.rate(component, 'tokenfan_live_frames_sent_total'))}   "
            f"bytes {_per_second(window.rate(component, 'tokenfan_live_sent_bytes_total'))}   "
            f"catch-up pages {_per_second(window.rate(component, 'tokenfan_live_catchup_pages_total'))}   "
            f"repairs {_per_second(window.rate(component, 'tokenfan_live_feed_repairs_total'))}",
            f"           fan-out lag   {_latencies(window, component, 'tokenfan_live_fanout_lag_seconds')}",
            f"           slow: {_by(window.rates_by(component, 'tokenfan_live_slow_consumers_total', 'policy'))}   "
            f"ended: {_by(window.rates_by(component, 'tokenfan_live_subscriptions_ended_total', 'code'))}",
        ]
    return lines


def _api(window: Window) -> list[str]:
    a = "api"
    return [
        f"API        requests: {_by(window.rates_by(a, 'tokenfan_api_requests_total', 'status'))}   "
        f"rate-limited {_per_second(window.rate(a, 'tokenfan_api_rate_limited_requests_total'))}   "
        f"SSE streams {window.gauge(a, 'tokenfan_api_sse_streams'):.0f}",
        f"           enqueue       {_latencies(window, a, 'tokenfan_api_enqueue_seconds')}",
        f"REDIS      errors: {_by(_redis_errors(window))}",
    ]


def _redis_errors(window: Window) -> dict[str, float]:
    rates = {c: window.rate(c, "tokenfan_redis_errors_total") for c in ("api", "relay", "worker")}
    return {component: rate for component, rate in rates.items() if rate}


def render(
    window: Window, sessions: Sequence[tuple[str, int, int]] | None, failed: Sequence[str] = ()
) -> str:
    """One frame: processes, workers, the live engine, the API, Redis errors, and the busiest sessions."""
    lines = [f"tokenfan top   {len(window.latest)} processes   {time.strftime('%H:%M:%S')}", ""]
    lines += _processes(window) + [f"unreachable: {url}" for url in failed] + [""]
    lines += [*_workers(window), "", *_relays(window), "", *_api(window), ""]
    lines.append("BUSIEST SESSIONS (subscribers, from Redis)")
    if sessions is None:
        lines.append("  Redis unreachable")
    for session_id, subscribers, processes in sessions or ():
        lines.append(f"  {session_id:<40} {subscribers:>7} subscribers on {processes} processes")
    return "\n".join(lines) + "\n"


async def _scrape(client: httpx.AsyncClient, url: str) -> Scrape | None:
    try:
        response = await client.get(url)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_scrape(url, response.text, time.monotonic())


async def _busiest(store: Store, limit: int) -> list[tuple[str, int, int]] | None:
    try:
        return await store.busiest(limit)
    except StorageUnavailable:
        return None


async def top(
    settings: Settings, urls: Sequence[str], *, interval: float, iterations: int, sessions: int
) -> None:
    """Show frames every `interval` seconds, `iterations` of them (0: until interrupted)."""
    store = Store.from_settings(settings)
    previous: dict[str, Scrape] = {}
    shown = 0
    async with httpx.AsyncClient(timeout=max(1.0, interval)) as client:
        try:
            while not iterations or shown < iterations:
                scrapes = await asyncio.gather(*(_scrape(client, url) for url in urls))
                latest = [scrape for scrape in scrapes if scrape is not None]
                failed = [url for url, scrape in zip(urls, scrapes, strict=True) if scrape is None]
                busiest = await _busiest(store, sessions) if sessions else []
                frame = render(Window(latest, previous), busiest, failed)
                sys.stdout.write((_CLEAR if sys.stdout.isatty() else "\n") + frame)
                sys.stdout.flush()
                previous = {scrape.url: scrape for scrape in latest}
                shown += 1
                if not iterations or shown < iterations:
                    await asyncio.sleep(interval)  # the view's refresh pace
        finally:
            with contextlib.suppress(Exception):
                await store.close()
