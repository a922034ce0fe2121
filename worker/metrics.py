"""What a worker measures: generations by outcome, the latencies users feel, and the cost of its writes.

Per generation (a lock each, nothing per token): attempts started and restarted, how each ended, upstream
retries, the time it waited in the queue, its time to first token. Per token, only what `TokenPace.tick`
does: a clock read, an integer increment and a `FastHistogram` observation; with metrics off, `NO_PACE`
does nothing. Per write to Redis: its latency and size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

from tokenfan.contract.events import GenerationStatus
from tokenfan.runtime.metrics import COUNT_BUCKETS, Metrics
from tokenfan.store import WriteItem

__all__ = ["NO_PACE", "TokenPace", "WorkerMetrics", "outcome_reason"]

#: The finish reasons OpenAI documents; a provider's other strings count as ``other`` (labels stay bounded).
_FINISH_REASONS: Final = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
#: Why a generation is cancelled (`generation.cancelled`'s ``reason``): asked for, replaced by a newer one
#: (``policy: interrupt``), nobody watching, or its attempt lost the generation.
_CANCEL_REASONS: Final = frozenset({"requested", "interrupted", "unwatched", "fenced"})


def outcome_reason(
    status: GenerationStatus, finish_reason: str | None, extra: dict[str, Any], error: dict[str, Any] | None
) -> str:
    """The ``reason`` label of a finished generation: the finish reason of a completed one, the error type
    of a failed one, why a cancelled one was cancelled."""
    if status is GenerationStatus.COMPLETED:
        return finish_reason if finish_reason in _FINISH_REASONS else "other"
    if status is GenerationStatus.CANCELLED:
        reason = extra.get("reason")
        return reason if isinstance(reason, str) and reason in _CANCEL_REASONS else "other"
    kind = (error or {}).get("type")
    return kind if isinstance(kind, str) else "other"  # a FailureType: a closed set


class TokenPace:
    """Times the tokens of one attempt: the first against the attempt's start, each later one against the one
    before it. `tick` once per token added to the stream."""

    __slots__ = ("_last", "_metrics", "_start")

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        last, self._last = self._last, now
        metrics = self._metrics
        metrics.tokens += 1
        if last is not None:
            metrics.token_gap.observe(now - last)
        else:
            metrics.first_token.observe(now - self._start)


class _NoPace(TokenPace):
    """A worker without a metrics port times nothing."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    def tick(self) -> None:
        return None


#: The pace of every attempt when metrics are off.
NO_PACE: Final[TokenPace] = _NoPace()


class WorkerMetrics:
    """The instruments of one worker process."""

    def __init__(self, metrics: Metrics) -> None:  # long: one declaration per instrument, each documented
        self.enabled = metrics.enabled
        self.started = metrics.counter(
            "tokenfan_worker_generations_started_total",
            "Attempts this worker began: generations it took from the queue, restarts included.",
        )
        self.restarts = metrics.counter(
            "tokenfan_worker_generation_restarts_total",
            "Attempts that restarted a generation whose earlier attempt's worker was lost (its lease ran out).",
        )
        self.finished = metrics.counter(
            "tokenfan_worker_generations_finished_total",
            "Generations this worker ended, by outcome (completed, failed, cancelled) and reason (the finish "
            "reason, the error type, or why it was cancelled).",
            ["outcome", "reason"],
        )
        self.retries = metrics.counter(
            "tokenfan_worker_upstream_retries_total",
            "Upstream requests tried again before their first token, by the failure that caused it.",
            ["cause"],
        )
        self.queue_wait = metrics.histogram(
            "tokenfan_worker_queue_wait_seconds",
            "From a generation's job entering the queue to a worker starting it (first attempts).",
        )
        self.first_token = metrics.histogram(
            "tokenfan_worker_time_to_first_token_seconds",
            "From an attempt's start to its first token (content, reasoning or tool call) from the upstream.",
        )
        self.token_gap = metrics.fast_histogram(
            "tokenfan_worker_inter_token_gap_seconds",
            "Time between two consecutive tokens of a generation, as the worker receives them.",
        )
        self.tokens = 0  # counted by `TokenPace.tick`, read at each scrape
        metrics.counts(
            "tokenfan_worker_tokens_total",
            "Tokens (upstream pieces: content, reasoning, tool-call arguments) streamed into sessions.",
            (),
            lambda: {(): self.tokens},
        )
        self.flush_events = metrics.histogram(
            "tokenfan_worker_flush_events", "Events written by one write to Redis.", buckets=COUNT_BUCKETS
        )
        self.flush_generations = metrics.histogram(
            "tokenfan_worker_flush_generations",
            "Generations whose events one write to Redis carried.",
            buckets=COUNT_BUCKETS,
        )
        self.write_seconds = metrics.histogram(
            "tokenfan_worker_redis_write_seconds",
            "Latency of one write to Redis (one script call per Redis, or per cluster slot, pipelined).",
        )
        self.running = metrics.gauge(
            "tokenfan_worker_generations_running", "Generations this worker is running now."
        )
        self.capacity = metrics.gauge(
            "tokenfan_worker_capacity", "Generations this worker runs at most at once (its concurrency)."
        )

    def pace(self) -> TokenPace:
        """The token clock of an attempt starting now."""
        return TokenPace(self) if self.enabled else NO_PACE

    def attempt_started(self, *, restarted: bool, enqueued_at: float | None) -> None:
        """An attempt began; `enqueued_at` (unix seconds) when its job entered the queue, for a first one."""
        self.started.inc()
        if restarted:
            self.restarts.inc()
        elif enqueued_at is not None:
            self.queue_wait.observe(
                max(0.0, time.time() - enqueued_at)
            )  # clocks of two hosts: never negative

    def finished_as(
        self,
        status: GenerationStatus,
        finish_reason: str | None,
        extra: dict[str, Any],
        error: dict[str, Any] | None,
    ) -> None:
        self.finished.labels(status.value, outcome_reason(status, finish_reason, extra, error)).inc()

    def flushed(self, items: Sequence[WriteItem], seconds: float) -> None:
        """One write to Redis carried `items` and took `seconds`."""
        self.write_seconds.observe(seconds)
        self.flush_events.observe(sum(len(item.events) for item in items))
        self.flush_generations.observe(len(items))
