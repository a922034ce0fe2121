"""What the live engine measures, in whichever process drives it (the relay; the API for SSE and the
OpenAI-compatible front door): subscriptions by transport, frames and bytes sent, catch-up pages, slow
subscribers, how subscriptions ended, fan-out lag, and feeds repaired after a pub/sub gap.

The fan-out's hot path pays once per batch per session, never per subscriber: the feed already sums the
frames its subscribers took, and the lag of a batch's entries is one `FastHistogram` pass after every
subscriber was written to. Counts on that path are plain integers, read at each scrape.

Fan-out lag is the time from an entry's append (its stream id is Redis's clock at the ``XADD``) to the moment
this process handed it to every live subscriber's transport. It compares two hosts' clocks: keep them in
step (NTP), as for any cross-host latency; a negative difference counts as zero.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from api.live.frames import FrameBatch
from tokenfan.contract.events import StreamEntry
from tokenfan.runtime.metrics import Metrics

__all__ = ["LiveMetrics", "Phase"]


class Phase:
    """Why a frame was sent: the `phase` label of frames and bytes sent."""

    LIVE = "live"  # a live batch from the feed
    CATCHUP = "catchup"  # a page of the stream, to a subscriber catching up
    SNAPSHOT = "snapshot"  # the snapshot that replaces a slow subscriber's backlog


class LiveMetrics:
    """The live engine's instruments in one process."""

    def __init__(self, metrics: Metrics) -> None:  # long: one declaration per instrument, each documented
        self.enabled = metrics.enabled
        self.subscriptions = metrics.gauge(
            "tokenfan_live_subscriptions",
            "Subscriptions open now (catching up, live or recovering), by transport: websocket (the "
            "relay), sse, openai (the OpenAI-compatible front door's answers).",
            ["transport"],
        )
        self.feeds = metrics.gauge(
            "tokenfan_live_feeds", "Sessions this process reads now (one shared reader each)."
        )
        self.history_bytes = metrics.gauge(
            "tokenfan_live_catchup_history_bytes",
            "What the catch-up histories of this process's feeds hold now, in approximate bytes (bounded by "
            "TOKENFAN_CATCHUP_HISTORY_BUDGET).",
        )
        self.pages = metrics.counter(
            "tokenfan_live_catchup_pages_total",
            "Pages of a session's stream read from Redis for subscribers catching up (one read serves every "
            "subscriber resuming from the same position at once).",
        )
        self.slow = metrics.counter(
            "tokenfan_live_slow_consumers_total",
            "Subscribers found too slow (write buffer over TOKENFAN_RELAY_MAX_BUFFER_BYTES), by the policy "
            "applied: snapshot (backlog replaced) or close (4008).",
            ["policy"],
        )
        self.ended = metrics.counter(
            "tokenfan_live_subscriptions_ended_total",
            "Subscriptions the server ended, by the code it sent (a close code, or an error frame or event).",
            ["code"],
        )
        self.repairs = metrics.counter(
            "tokenfan_live_feed_repairs_total",
            "Shared readers that re-read the stream because pub/sub missed entries: a message that did not "
            "follow the last one (gap), or a subscription confirmed again after a reconnect (resubscribed).",
            ["cause"],
        )
        self.lag = metrics.fast_histogram(
            "tokenfan_live_fanout_lag_seconds",
            "From an entry's append to Redis to its live batch reaching every subscriber's transport.",
        )
        self.live_frames = self.live_bytes = 0  # the hot path's: plain attributes
        self.frames = {Phase.CATCHUP: 0, Phase.SNAPSHOT: 0}
        self.bytes = {Phase.CATCHUP: 0, Phase.SNAPSHOT: 0}
        metrics.counts(
            "tokenfan_live_frames_sent_total",
            "Frames sent to subscribers (one frame to n subscribers counts n), by phase.",
            ("phase",),
            lambda: {(Phase.LIVE,): self.live_frames, **{(phase,): n for phase, n in self.frames.items()}},
        )
        metrics.counts(
            "tokenfan_live_sent_bytes_total",
            "Bytes of frames sent to subscribers (JSON, before the transport's framing), by phase.",
            ("phase",),
            lambda: {(Phase.LIVE,): self.live_bytes, **{(phase,): n for phase, n in self.bytes.items()}},
        )

    def sent(self, phase: str, frame: bytes) -> None:
        """One frame of a catch-up page or a snapshot went to one subscriber."""
        self.frames[phase] += 1
        self.bytes[phase] += len(frame)

    def sent_many(self, phase: str, frames: int, frame_bytes: int) -> None:
        """`frames` frames of `frame_bytes` bytes in all went to one subscriber."""
        self.frames[phase] += frames
        self.bytes[phase] += frame_bytes

    def fanned_out(self, batch: FrameBatch, frames_sent: int) -> None:
        """The feed delivered `batch`: its subscribers took `frames_sent` frames in all. A subscriber that
        took only part of it (it joined mid-batch) counts at the batch's mean frame size."""
        if not self.enabled or not frames_sent:
            return
        frames, entries = batch.frames, batch.entries
        self.live_frames += frames_sent
        now_ms = time.time() * 1000
        if len(entries) == 1:  # the live edge, nearly every batch: no list, no loop
            self.live_bytes += frames_sent * len(frames[0])
            self.lag.observe(max(0.0, now_ms - entries[0].stream_id.ms) / 1000)
            return
        self.live_bytes += frames_sent * sum(map(len, frames)) // len(frames)
        self.lag.observe_many(_lags(entries, now_ms))


def _lags(entries: Sequence[StreamEntry], now_ms: float) -> list[float]:
    return [max(0.0, now_ms - entry.stream_id.ms) / 1000 for entry in entries]
