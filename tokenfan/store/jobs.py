"""The job queue contract between the API and the workers: arq, JSON-serialized, one job per generation.

The job id is the generation id, so arq itself refuses a second copy of a job that is still queued or
running. Only the head of a session's queue ever has a job: the API enqueues it when a generation arrives
at an idle session, and the worker that finishes a generation enqueues the next one (`Store.write` returns
it atomically with the finish), through `hand_over`. The worker's side of the queue is `job_runner`.

`Retry` is arq's: a job raises it to run again later (``Retry(defer=seconds)``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Retry

from tokenfan.contract.keys import ARQ_QUEUE
from tokenfan.store.boundary import storage_call

__all__ = [
    "JOB_FUNCTION",
    "JobQueue",
    "Retry",
    "create_queue",
    "deserialize_job",
    "enqueue_generation",
    "hand_over",
    "queue_settings",
    "serialize_job",
]

JOB_FUNCTION = "generate"

#: A connection to the job queue (`create_queue`): arq's client, a Redis client too.
JobQueue = ArqRedis


def serialize_job(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def deserialize_job(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("a job is a JSON object")
    return value


#: TLS options taken from a ``rediss://`` URL's query, as redis-py reads them (arq's own parser drops them).
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


def queue_settings(redis_url: str) -> RedisSettings:
    """arq's connection settings for `redis_url`, honouring the same TLS query options as our own client."""
    settings = RedisSettings.from_dsn(redis_url)
    url = urlsplit(redis_url)
    # arq keeps the URL's userinfo percent-encoded; redis-py decodes it. Decode, or a password with
    # '@', ':' or '/' in it would work for one client and fail AUTH for the other.
    settings.username = unquote(url.username) if url.username else None
    settings.password = unquote(url.password) if url.password else None
    if url.scheme == "rediss":
        settings.ssl_check_hostname = True  # a certificate must name the server; the URL may say otherwise
    for name, values in parse_qs(url.query).items():
        if name in _TLS_OPTIONS and values:
            value: object = values[-1]
            if name == "ssl_check_hostname":
                value = values[-1].lower() in ("1", "true", "yes")
            setattr(settings, name, value)
    return settings


async def create_queue(redis_url: str) -> ArqRedis:
    return await create_pool(
        queue_settings(redis_url),
        default_queue_name=ARQ_QUEUE,
        job_serializer=serialize_job,
        job_deserializer=deserialize_job,
    )


@storage_call
async def enqueue_generation(queue: ArqRedis, session_id: str, generation_id: str) -> bool:
    """Enqueue the job of one generation; False (and nothing done) when its job is already queued or
    running."""
    job = await queue.enqueue_job(
        JOB_FUNCTION, session_id, generation_id, _job_id=generation_id, _queue_name=ARQ_QUEUE
    )
    return job is not None


async def hand_over(
    queue: ArqRedis,
    session_id: str,
    generation_id: str,
    still_waiting: Callable[[], Awaitable[bool]],
    *,
    within: float = 10.0,
) -> bool:
    """Enqueue the job of the generation that just reached the head of its session's queue.

    arq refuses a job id that is queued or running, and the job holding it may be the generation's early
    job (the API enqueues one before accepting, in case it dies in between) which ran before its turn,
    found the generation waiting, and is about to end without running it. Taking that refusal as "done"
    would leave the generation queued forever. So while the generation still waits (`still_waiting`) and
    the id is taken, try again, for at most `within` seconds. Returns whether this call enqueued it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.02
    while True:
        if await enqueue_generation(queue, session_id, generation_id):
            return True
        if not await still_waiting() or loop.time() + delay > deadline:
            return False  # the job that holds the id has started it (or will, as a deferred retry)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
