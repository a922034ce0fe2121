"""The worker process: an arq worker running `GenerationJob`, plus the three tasks that keep it honest.

* the stream writer's flusher (`StreamWriter.run`);
* the lease heartbeat: renews each running generation's lease, learns of cancellations (a backstop for a
  stalled upstream that produces nothing to write), and shortens arq's in-progress key to the lease, so a
  crashed worker's generation is taken up by another within the lease instead of after the job timeout;
* the cancel listener: the pub/sub fast path for cancellation requests from any API process.

Each deals with Redis failures itself; if one ends all the same (a bug), the worker stops as on SIGTERM and
exits with an error, rather than go on taking jobs without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from signal import SIGTERM
from typing import Any

import structlog
from opentelemetry.trace import Tracer

from tokenfan.contract.errors import StorageUnavailable
from tokenfan.runtime.metrics import Metrics
from tokenfan.runtime.serving import Lifelong, settle_collector, write_ready_file
from tokenfan.runtime.settings import Settings
from tokenfan.runtime.tracing import tracer_from_env
from tokenfan.store import LeaseReply, Store
from tokenfan.store.boundary import expose_redis_errors
from tokenfan.store.cancellations import listen_for_cancellations
from tokenfan.store.job_runner import expire_claims, generation_worker, supervise
from tokenfan.store.jobs import JobQueue, create_queue, hand_over
from tokenfan.store.per_node import PerNode
from worker.generate import GenerationJob, RetryPolicy
from worker.hooks import load_hooks
from worker.metrics import WorkerMetrics
from worker.stream_writer import GenerationStream, StreamWriter
from worker.upstream import Upstream
from worker.usage import warm_up

__all__ = ["run_worker"]

log = structlog.get_logger("tokenfan.worker")


async def _heartbeat(
    store: Store, queue: JobQueue, writer: StreamWriter, interval: float, alive_file: Path | None
) -> None:
    """Every `interval`, renew the running generations' leases, node by node (`PerNode`, by `FlushLane`): a
    node that does not answer holds up the renewals of its own generations only. Were they renewed all at
    once, a hung primary would keep every lease of the worker from being renewed, and once they lapsed every
    one of its generations, on every node, would be restarted by another worker."""
    renewals = PerNode("heartbeat")
    try:
        while True:
            await asyncio.sleep(interval)
            if alive_file is not None:
                alive_file.touch()  # noqa: ASYNC240 - one utime a few seconds apart: the loop turns
            by_lane: dict[str, list[GenerationStream]] = {}
            for stream in writer.streams.values():
                by_lane.setdefault(stream.lane.name, []).append(stream)
            for lane, streams in by_lane.items():
                renewals.start(lane, _renew(store, queue, streams))
    finally:
        renewals.close()


async def _renew(store: Store, queue: JobQueue, streams: list[GenerationStream]) -> None:
    """Renew the leases of `streams` (one node's), keep arq's claims on their jobs to the lease, and act on
    what the renewal says: a cancellation asked for, or an attempt fenced."""
    try:
        replies = await store.renew_leases([(s.session_id, s.generation_id, s.attempt) for s in streams])
        await expire_claims(queue, [stream.generation_id for stream in streams], store.lease_ms)
        await _cancel_unwatched(store, [s for s in streams if s.unwatched_limit])
    except StorageUnavailable as exc:
        log.warning("heartbeat_failed", error=str(exc.__cause__ or exc), node=streams[0].lane.name)
        return
    for stream, reply in zip(streams, replies, strict=True):
        if reply == LeaseReply.FENCED:
            stream.fenced = True
            stream.request_cancel("fenced")
        elif reply:
            stream.request_cancel(reply)


async def _cancel_unwatched(store: Store, streams: list[GenerationStream]) -> None:
    """Cancel generations that asked for it once nobody has watched their session for long enough."""
    if not streams:
        return
    now = asyncio.get_running_loop().time()
    for stream, watched in zip(streams, await store.watched([s.session_id for s in streams]), strict=True):
        if watched:
            stream.unwatched_since = None
            continue
        stream.unwatched_since = stream.unwatched_since or now
        if stream.unwatched_limit is not None and now - stream.unwatched_since >= stream.unwatched_limit:
            log.info(
                "generation_unwatched",
                session_id=stream.session_id,
                generation_id=stream.generation_id,
                job_id=stream.generation_id,
            )
            await store.request_cancel(stream.session_id, stream.generation_id, "unwatched")


def _cancel_running(writer: StreamWriter) -> Callable[[str, str], None]:
    """What a cancellation request from pub/sub does: cancel the attempt this process runs, if any."""

    def cancel(generation_id: str, reason: str) -> None:
        stream = writer.streams.get(generation_id)
        if stream is not None:
            stream.request_cancel(reason)

    return cancel


def _generation_job(
    settings: Settings,
    store: Store,
    queue: JobQueue,
    writer: StreamWriter,
    upstream: Upstream,
    tracer: Tracer | None,
) -> GenerationJob:
    async def enqueue(session_id: str, generation_id: str) -> None:
        await hand_over(queue, session_id, generation_id, lambda: store.is_queued(session_id, generation_id))

    async def claim(generation_id: str) -> None:
        await expire_claims(queue, [generation_id], store.lease_ms)

    return GenerationJob(
        store,
        writer,
        upstream,
        enqueue,
        retry=RetryPolicy(
            max_retries=settings.upstream_max_retries, budget_seconds=settings.upstream_retry_budget_seconds
        ),
        timeout_seconds=settings.job_timeout_seconds,
        hooks=load_hooks(settings.worker_hooks),
        on_claimed=claim,
        tracer=tracer,
    )


def _stream_writer(settings: Settings, store: Store, metrics: Metrics, capacity: int) -> StreamWriter:
    """The process's writer, and with it the worker's instruments on `metrics` (the store's Redis errors and
    the generations running now are read at each scrape); `capacity`: the generations it runs at once."""
    expose_redis_errors(metrics)
    instruments = WorkerMetrics(metrics)
    writer = StreamWriter(
        store,
        flush_window=settings.flush_window_ms / 1000,
        max_pending_bytes=settings.flush_max_bytes,
        merge=settings.coalesce,
        metrics=instruments,
    )
    instruments.running.set_function(lambda: len(writer.streams))  # len(): atomic for the scrape's thread
    instruments.capacity.set(capacity)
    return writer


class _Background:
    """The tasks that run beside the jobs for the process's life, started once arq's loop first runs: three
    lifelong ones (`Lifelong`: if one ends, `stop` stops the worker as a SIGTERM does, running generations
    handed over, and it exits with an error), and the warm-up."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self.lifelong = Lifelong(stop)
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, store: Store, queue: JobQueue, writer: StreamWriter, alive_file: str | None) -> None:
        alive = Path(alive_file) if alive_file else None
        if alive is not None:
            alive.touch()
        heartbeat = _heartbeat(store, queue, writer, store.lease_ms / 3000, alive)
        cancellations = listen_for_cancellations(store.topology, _cancel_running(writer))
        self.tasks = [
            asyncio.create_task(writer.run(), name="stream-writer"),
            asyncio.create_task(heartbeat, name="heartbeat"),
            asyncio.create_task(cancellations, name="cancel-listener"),
        ]
        for task in self.tasks:
            self.lifelong.watch(task)
        self.tasks.append(asyncio.create_task(asyncio.to_thread(warm_up), name="warm-up-usage"))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run_worker(
    settings: Settings,
    *,
    concurrency: int | None = None,
    ready_file: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Run one worker process until SIGINT/SIGTERM; its metrics (``TOKENFAN_METRICS_PORT``) on `host`."""
    store = Store.from_settings(settings)
    store.topology.pack_with_hiredis()
    metrics = Metrics("worker", enabled=settings.metrics_port is not None)
    writer = _stream_writer(settings, store, metrics, concurrency or settings.worker_concurrency)
    upstream = Upstream(settings)
    queue = await create_queue(settings.queue_url)
    job = _generation_job(settings, store, queue, writer, upstream, tracer_from_env("worker"))
    background = _Background(lambda: worker.handle_sig(SIGTERM))
    ready = metrics.expose(host, settings.metrics_port)

    async def generate(ctx: dict[str, Any], session_id: str, generation_id: str) -> None:
        enqueued = ctx.get("enqueue_time")  # arq's: when the job entered the queue
        enqueued_at = enqueued.timestamp() if enqueued is not None else None
        await job(session_id, generation_id, job_try=int(ctx.get("job_try", 1)), enqueued_at=enqueued_at)

    async def on_startup(ctx: dict[str, Any]) -> None:
        if background.tasks:  # arq's loop was re-entered after Redis came back: our tasks never stopped
            log.info("worker_resumed")
            return
        settle_collector()
        background.start(store, queue, writer, settings.worker_alive_file)
        log.info("worker_ready", concurrency=concurrency or settings.worker_concurrency)
        write_ready_file(ready_file, "", role="worker", **ready)

    worker = generation_worker(
        generate,
        queue=queue,
        max_jobs=concurrency or settings.worker_concurrency,
        poll_delay=settings.worker_poll_interval_seconds,
        job_timeout_seconds=settings.job_timeout_seconds,
        on_startup=on_startup,
    )
    try:
        await supervise(worker)
    finally:
        await worker.close()
        await background.stop()
        await upstream.close()
        await store.redis.aclose()
        metrics.close()
    background.lifelong.check()
