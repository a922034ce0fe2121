"""The job queue: one JSON job per generation, and never two copies of one generation's job."""

from __future__ import annotations

import pytest

from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.ids import new_generation_id
from tokenfan.store.jobs import create_queue, deserialize_job, enqueue_generation, serialize_job


def test_jobs_are_json_objects() -> None:
    job = {"t": 1, "f": "generate", "a": ["s", "g"], "k": {}}
    assert deserialize_job(serialize_job(job)) == job
    with pytest.raises(ValueError, match="JSON object"):
        deserialize_job(b"[1]")


async def test_a_generations_job_is_enqueued_once(queue_server: EmbeddedRedis) -> None:
    queue = await create_queue(queue_server.url)
    try:
        generation_id = new_generation_id()
        assert await enqueue_generation(queue, "s", generation_id)
        assert not await enqueue_generation(queue, "s", generation_id)  # its job id is the generation id
        (job,) = [job for job in await queue.queued_jobs() if job.job_id == generation_id]
        assert (job.function, list(job.args)) == ("generate", ["s", generation_id])  # JSON: a list
    finally:
        await queue.aclose()
