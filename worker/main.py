"""The worker process: an arq worker running `GenerationJob`, plus the three tasks that keep it honest.

* the stream writer's flusher (`StreamWriter.run`);
* the lease heartbeat: renews each running generation's lease, learns of cancellations (a backstop for a
  stalled upstream that produces nothing to write), and shortens arq's in-progress key to the lease, so a
  crashed worker's generation is taken up by another within the lease instead of after the job timeout;
* the cancel listener: the pub/sub fast path for cancellation requests from any API process.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import structlog
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.connection import HiredisRespSerializer
from redis.exceptions import RedisError
from redis.utils import HIREDIS_AVAILABLE

from tokenfan.contract.errors import StorageUnavailable
from tokenfan.contract.keys import ARQ_QUEUE, CANCEL_CHANNEL, arq_in_progress_key
from tokenfan.runtime.serving import write_ready_file
from tokenfan.runtime.settings import Settings
from tokenfan.store import Store, redis_client
from tokenfan.store.jobs import JOB_FUNCTION, create_queue, deserialize_job, hand_over, serialize_job
from worker.generate import GenerationJob, RetryPolicy
from worker.hooks import load_hooks
from worker.stream_writer import GenerationStream, StreamWriter
from worker.upstream import Upstream
from worker.usage import warm_up

__all__ = ["run_worker"]

log = structlog.get_logger("tokenfan.worker")


async def _heartbeat(store: Store, writer: StreamWriter, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        streams = list(writer.streams.values())
        if not streams:
            continue
        try:
            replies = await store.renew_leases([(s.session_id, s.generation_id, s.attempt) for s in streams])
            async with store.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.pexpire(arq_in_progress_key(stream.generation_id), store.lease_ms)
                await pipe.execute()
            await _cancel_unwatched(store, [s for s in streams if s.unwatched_limit])
        except (StorageUnavailable, RedisError) as exc:
            log.warning("heartbeat_failed", error=str(exc))
            continue
        for stream, reply in zip(streams, replies, strict=True):
            if reply == "fenced":
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
            log.info("generation_unwatched", generation_id=stream.generation_id)
            await store.request_cancel(stream.session_id, stream.generation_id, "unwatched")


async def _cancel_listener(redis: Redis, writer: StreamWriter) -> None:
    while True:
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    generation_id, _, reason = message["data"].decode().partition(" ")
                    stream = writer.streams.get(generation_id)
                    if stream is not None:
                        stream.request_cancel(reason or "requested")
        except RedisError as exc:
            log.warning("cancel_listener_reconnecting", error=str(exc))
            await asyncio.sleep(0.5)


class _HiredisPacking:
    """Packs commands with hiredis (C), as redis-py's synchronous connections already do.

    redis-py 5's asyncio connection packs in Python, growing one buffer by concatenation per argument: about
    1 us per argument on small commands and far more on large ones. The writer's one script call per flush
    carries some 20 arguments per generation, so at 500 generations that packing alone cost more than
    reading the tokens (docs/BENCHMARKS.md). The bytes sent are the same."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


def _pack_with_hiredis(redis: Redis) -> None:
    """Make every connection `redis` opens from now on pack commands with hiredis (when installed)."""
    pool = redis.connection_pool
    if HIREDIS_AVAILABLE and not issubclass(pool.connection_class, _HiredisPacking):
        base = pool.connection_class
        pool.connection_class = type(f"HiredisPacking{base.__name__}", (_HiredisPacking, base), {})


def _tune_gc() -> None:
    """Once started: what is loaded so far lives as long as the process, so the cyclic collector stops
    traversing it (``gc.freeze``), and it collects the young generation every 10,000 allocations instead of
    every 700. Each token allocates a few dicts and lists that die young; with the default thresholds the
    collector ran about 20 times a second at 7,500 tokens/s and took 7% of the worker's CPU, under 1% with
    these (measured with bench/worker.py at 150 generations)."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


#: Jobs claimed concurrently by one poll (`_Worker.start_jobs`).
_CLAIMS_AT_ONCE = 16


class _Worker(Worker):
    """arq's worker, polling the queue in one round trip instead of four per running job.

    arq keeps a job in its queue until the job ends, and each poll (every ``poll_delay``) examines every id in
    the queue with WATCH, EXISTS, ZSCORE and UNWATCH, one round trip each, running jobs included. Generations
    run for minutes and a worker holds hundreds: at 500 that is 2,000 round trips per poll, most of a core.
    Here a poll first drops the jobs this process is running, then asks in one pipelined round trip which of
    the rest another worker has in progress; arq's own claim (which checks again, under WATCH) then sees only
    the jobs that may really be free, and claims up to `_CLAIMS_AT_ONCE` of them at once. What is claimed,
    and how, is unchanged."""

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        candidates = []
        for job_id in job_ids:
            task = self.tasks.get(job_id.decode())
            if task is None or task.done():
                candidates.append(job_id)
        if candidates:
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in candidates:
                    pipe.exists(arq_in_progress_key(job_id.decode()))
                busy = await pipe.execute()
            candidates = [job_id for job_id, taken in zip(candidates, busy, strict=True) if not taken]
        # arq claims one job after another, four round trips each. On a worker busy streaming, each round trip
        # waits a turn of a crowded event loop, and 500 new generations took over a minute to start; claims
        # are independent (each WATCHes its own key on its own connection), so a few go at once.
        claim = super().start_jobs
        for first in range(0, len(candidates), _CLAIMS_AT_ONCE):
            await asyncio.gather(*(claim([job_id]) for job_id in candidates[first : first + _CLAIMS_AT_ONCE]))


async def _supervise(worker: Worker) -> None:
    """Run arq's loop until shutdown. arq lets a Redis error end its loop (and the process); a worker
    must instead ride out a Redis restart, so the loop is re-entered with backoff. Running generations are
    not touched: their own writes retry."""
    backoff = 0.2
    while True:
        try:
            await worker.async_run()
            return
        except asyncio.CancelledError:
            return  # a stop signal (arq cancels its loop)
        except (RedisError, OSError) as exc:
            log.error("queue_unreachable", error=str(exc), retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


async def run_worker(
    settings: Settings, *, concurrency: int | None = None, ready_file: str | None = None
) -> None:
    """Run one worker process until SIGINT/SIGTERM."""
    redis_url = settings.redis_url.reveal()
    redis = redis_client(redis_url)
    _pack_with_hiredis(redis)
    store = Store(
        redis,
        session_ttl_seconds=settings.session_ttl_seconds,
        stream_max_length=settings.stream_max_length,
        lease_ms=int(settings.lease_seconds * 1000),
        max_attempts=settings.max_attempts,
    )
    writer = StreamWriter(
        store,
        flush_window=settings.flush_window_ms / 1000,
        max_pending_bytes=settings.flush_max_bytes,
        merge=settings.coalesce,
    )
    upstream = Upstream(settings)
    queue = await create_queue(redis_url)

    async def enqueue(session_id: str, generation_id: str) -> None:
        await hand_over(queue, session_id, generation_id, lambda: store.is_queued(session_id, generation_id))

    async def claim(generation_id: str) -> None:
        # arq counts a job abandoned only when its in-progress key expires: job timeout + 10 s by default.
        # Bringing that down to our lease (and the heartbeat keeping it there) is what lets another worker
        # take over a crashed worker's generation within the lease, however long generations may run.
        await redis.pexpire(arq_in_progress_key(generation_id), store.lease_ms)

    job = GenerationJob(
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
    )

    async def generate(ctx: dict[str, Any], session_id: str, generation_id: str) -> None:
        await job(session_id, generation_id, job_try=int(ctx.get("job_try", 1)))

    background: list[asyncio.Task[None]] = []

    async def on_startup(ctx: dict[str, Any]) -> None:
        if background:  # arq's loop was re-entered after Redis came back: our tasks never stopped
            log.info("worker_resumed")
            return
        _tune_gc()
        background.append(asyncio.create_task(asyncio.to_thread(warm_up), name="warm-up-usage"))
        background.append(asyncio.create_task(writer.run(), name="stream-writer"))
        background.append(
            asyncio.create_task(_heartbeat(store, writer, store.lease_ms / 3000), name="heartbeat")
        )
        background.append(asyncio.create_task(_cancel_listener(redis, writer), name="cancel-listener"))
        log.info("worker_ready", concurrency=concurrency or settings.worker_concurrency)
        write_ready_file(ready_file, "", role="worker")

    worker = _Worker(
        functions=[
            # arq's own retry cap sits above ours: `Store.start` counts attempts and fails the generation.
            func(generate, name=JOB_FUNCTION, max_tries=1_000, timeout=settings.job_timeout_seconds + 60),
        ],
        redis_pool=queue,
        queue_name=ARQ_QUEUE,
        max_jobs=concurrency or settings.worker_concurrency,
        keep_result=0,
        poll_delay=settings.worker_poll_interval_seconds,
        job_serializer=serialize_job,
        job_deserializer=deserialize_job,
        on_startup=on_startup,
        handle_signals=True,
        log_results=False,
    )
    try:
        await _supervise(worker)
    finally:
        await worker.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await upstream.close()
        await redis.aclose()
