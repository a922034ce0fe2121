"""The worker's side of the job queue: claims shortened to the lease, and a poll that skips busy jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from arq.constants import in_progress_key_prefix

from tests.store.helpers import resolved
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import ARQ_IN_PROGRESS_PREFIX, arq_in_progress_key
from tokenfan.store.job_runner import expire_claims, generation_worker
from tokenfan.store.jobs import create_queue, enqueue_generation


def test_the_in_progress_prefix_is_arqs_own() -> None:
    """The worker shortens arq's claim on a job by its key's name: a rename in arq must not go unnoticed."""
    assert in_progress_key_prefix == ARQ_IN_PROGRESS_PREFIX


async def test_claims_expire_with_the_lease(queue_server: EmbeddedRedis) -> None:
    queue = await create_queue(queue_server.url)
    try:
        ids = [new_generation_id(), new_generation_id()]
        for generation_id in ids:
            await queue.set(arq_in_progress_key(generation_id), b"1", ex=3600)  # as arq claims a job
        await expire_claims(queue, ids, 5_000)
        for generation_id in ids:
            assert 0 < await resolved(queue.pttl(arq_in_progress_key(generation_id))) <= 5_000
    finally:
        await queue.aclose()


async def test_a_poll_runs_free_jobs_and_leaves_those_running_elsewhere(queue_server: EmbeddedRedis) -> None:
    queue = await create_queue(queue_server.url)
    ran: asyncio.Queue[str] = asyncio.Queue()

    async def job(ctx: dict[str, Any], session_id: str, generation_id: str) -> None:
        await ran.put(generation_id)

    async def started(ctx: dict[str, Any]) -> None:
        return None

    worker = generation_worker(
        job, queue=queue, max_jobs=10, poll_delay=60, job_timeout_seconds=60, on_startup=started
    )
    try:
        elsewhere, free = new_generation_id(), new_generation_id()
        for generation_id in (elsewhere, free):
            assert await enqueue_generation(queue, "s", generation_id)
        await queue.set(arq_in_progress_key(elsewhere), b"1", ex=60)  # another worker runs it
        await worker.start_jobs([elsewhere.encode(), free.encode()])
        async with asyncio.timeout(10):
            assert await ran.get() == free
            await worker.tasks[free]  # arq's bookkeeping after the job, before the queue closes
        assert elsewhere not in worker.tasks
    finally:
        await queue.aclose()  # not worker.close(): arq closes its pool with a call redis-py deprecates
