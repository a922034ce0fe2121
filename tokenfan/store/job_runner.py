"""The worker's side of the job queue: arq's worker loop, tuned for generations that run for minutes.

* `generation_worker` builds the arq worker that runs `JOB_FUNCTION`, polling the queue in one round trip
  (`_QueueWorker`);
* `supervise` runs its loop and re-enters it after Redis failures, instead of letting the process end;
* `expire_claims` shortens arq's claim on a job (its in-progress key) to the lease, so that a crashed
  worker's generation is taken up by another within the lease instead of after the job timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.typing import StartupShutdown, WorkerCoroutine
from arq.worker import Worker, func
from redis.exceptions import RedisError

from tokenfan.contract.keys import ARQ_QUEUE, arq_in_progress_key
from tokenfan.store.boundary import count_failure, storage_call
from tokenfan.store.jobs import JOB_FUNCTION, deserialize_job, serialize_job

__all__ = ["JobWorker", "expire_claims", "generation_worker", "supervise"]

log = structlog.get_logger("tokenfan.store.jobs")

#: Jobs claimed concurrently by one poll (`_QueueWorker.start_jobs`).
_CLAIMS_AT_ONCE = 16


class _QueueWorker(Worker):
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

    async def run_job(self, job_id: str, score: int) -> None:
        # arq runs each job in a task of its own: bound here, the job's ids are on every line logged for it,
        # arq's own included (a job's id is its generation's id; the job binds its session's).
        structlog.contextvars.bind_contextvars(job_id=job_id, generation_id=job_id)
        await super().run_job(job_id, score)


#: The worker `generation_worker` builds: `supervise` runs it, ``await worker.close()`` ends it.
JobWorker = Worker


def generation_worker(
    job: WorkerCoroutine,
    *,
    queue: ArqRedis,
    max_jobs: int,
    poll_delay: float,
    job_timeout_seconds: float,
    on_startup: StartupShutdown,
) -> JobWorker:
    """The arq worker running ``job(ctx, session_id, generation_id)`` for each generation's job in
    `ARQ_QUEUE`, up to `max_jobs` at once. It calls ``on_startup(ctx)`` when its loop starts (again each
    time `supervise` re-enters it), and stops on SIGINT/SIGTERM, re-queuing the jobs it was running."""
    return _QueueWorker(
        functions=[
            # arq's own retry cap sits above ours: `Store.start` counts attempts and fails the generation.
            func(job, name=JOB_FUNCTION, max_tries=1_000, timeout=job_timeout_seconds + 60),
        ],
        redis_pool=queue,
        queue_name=ARQ_QUEUE,
        max_jobs=max_jobs,
        keep_result=0,
        poll_delay=poll_delay,
        job_serializer=serialize_job,
        job_deserializer=_deserialize_named,
        on_startup=on_startup,
        handle_signals=True,
        log_results=False,
    )


def _deserialize_named(raw: bytes) -> dict[str, Any]:
    """A job, read by arq in the task that runs it, before arq logs anything about it: its session,
    generation and job ids are bound here to every log line of that task (arq's own ``→ ←`` lines, and
    through the job function's context, ours), as docs/OPERATIONS.md promises."""
    job = deserialize_job(raw)
    args = job.get("a")
    if isinstance(args, list) and len(args) == 2 and all(isinstance(arg, str) for arg in args):
        session_id, generation_id = args
        structlog.contextvars.bind_contextvars(
            session_id=session_id, generation_id=generation_id, job_id=generation_id
        )
    return job


async def supervise(worker: JobWorker) -> None:
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
            count_failure("job_queue", exc)
            log.error("queue_unreachable", error=str(exc), retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


@storage_call
async def expire_claims(queue: ArqRedis, generation_ids: Sequence[str], ttl_ms: int) -> None:
    """Make arq's claim on each generation's job (its in-progress key) expire `ttl_ms` from now.

    arq counts a job abandoned only when its in-progress key expires: job timeout + 10 s by default. Keeping
    that down to the lease (at the claim, then at each heartbeat) is what lets another worker take over a
    crashed worker's generation within the lease, however long generations may run. The claims live where
    arq's queue lives, so they go through the queue's own connection."""
    async with queue.pipeline(transaction=False) as pipe:
        for generation_id in generation_ids:
            pipe.pexpire(arq_in_progress_key(generation_id), ttl_ms)
        await pipe.execute()
