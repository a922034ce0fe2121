"""The generate job in this process, against the test stack's Redis and simulator: a cancellation (or an
interrupt) wins whenever it arrives after the accept, even while a worker hook's ``on_start`` runs.

The job runs here, not in a worker process, so that the test knows when its hook is running; its
generation has no arq job, so the stack's own workers never touch it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.support.requests import new_session_id, user_message
from tests.support.stack import RunningStack
from tests.support.waiting import wait_for_condition
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import CANCEL_CHANNEL, SessionKeys
from tokenfan.runtime.settings import Settings
from tokenfan.store import Store
from tokenfan.store.cancellations import listen_for_cancellations
from worker.generate import GenerationJob
from worker.hooks import HookContext
from worker.stream_writer import StreamWriter
from worker.upstream import Upstream

# The usage estimate of a cancelled generation loads bpe_openai's encodings, which that package does with a
# deprecated importlib call; in a worker process it is a warning, here it would fail the job.
pytestmark = pytest.mark.filterwarnings("ignore:open_binary is deprecated:DeprecationWarning")


class HeldHooks:
    """An ``on_start`` that holds the generation until the test lets it go; or, `unwritable`, one with a
    bug that hands the writer an event Redis's client cannot encode."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.unwritable = False

    async def on_start(self, ctx: HookContext) -> None:
        if self.unwritable:
            ctx._stream.add_event("x.bug", note="\ud800")  # past emit's own check, as a bug would go
            return
        self.entered.set()
        await self.release.wait()

    async def before_finish(self, ctx: HookContext, status: str) -> None:
        return None


@dataclass
class InProcessWorker:
    store: Store
    writer: StreamWriter
    hooks: HeldHooks
    job: GenerationJob
    handed_over: list[str] = field(default_factory=list)  # what the job enqueued after finishing
    heard: list[str] = field(default_factory=list)  # generation ids of the cancellations it heard


@pytest.fixture
async def worker(stack: RunningStack, redis_server: EmbeddedRedis) -> AsyncIterator[InProcessWorker]:
    settings = Settings.from_env(
        {"REDIS_URL": redis_server.url, "OPENAI_BASE_URL": f"{stack.simulator_url}/v1"}
    )
    store = Store.from_settings(settings)
    writer = StreamWriter(store)
    upstream = Upstream(settings)
    hooks = HeldHooks()
    handed_over: list[str] = []

    async def enqueue(session_id: str, generation_id: str) -> None:
        handed_over.append(generation_id)

    job = GenerationJob(store, writer, upstream, enqueue, hooks=hooks)
    parts = InProcessWorker(store, writer, hooks, job, handed_over)

    def cancel(generation_id: str, reason: str) -> None:  # what the worker process does with a request
        parts.heard.append(generation_id)
        stream = writer.streams.get(generation_id)
        if stream is not None:
            stream.request_cancel(reason)

    tasks = [
        asyncio.create_task(writer.run()),
        asyncio.create_task(listen_for_cancellations(store.topology, cancel)),
    ]
    probe = f"probe-{new_generation_id()}"

    async def listening() -> bool:
        await store.topology.client(store.topology.primaries()[0]).publish(CANCEL_CHANNEL, f"{probe} probe")
        return probe in parts.heard

    try:
        await wait_for_condition(listening)  # the listener is subscribed: no request can slip past it
        yield parts
    finally:
        hooks.release.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()
        await store.close()


async def event_types(store: Store, session_id: str) -> list[str]:
    entries = await store.redis.xrange(SessionKeys(session_id).events)
    return [json.loads(fields[b"d"])["type"] for _, fields in entries]


async def accepted(store: Store, session_id: str, policy: str = "enqueue") -> str:
    generation_id = new_generation_id()
    body = user_message("held at the start", {"tokens": 200})
    await store.accept(session_id, generation_id, request=body, model=body["model"], policy=policy)
    return generation_id


async def held_while(worker: InProcessWorker, session_id: str, generation_id: str) -> asyncio.Task[None]:
    """Run the generation's job until its ``on_start`` hook holds it."""
    running = asyncio.create_task(worker.job(session_id, generation_id))
    async with asyncio.timeout(10):
        await worker.hooks.entered.wait()
    return running


async def heard_or_ended(worker: InProcessWorker, generation_id: str, running: asyncio.Task[None]) -> None:
    """Wait until the running attempt has heard the cancellation (its hook still holding it), or the job
    has ended already (the cancellation stopped the hook); then let the hook go."""
    record = await worker.store.generation(generation_id)
    assert record is not None
    assert record.cancel_requested

    async def heard() -> bool:
        stream = worker.writer.streams.get(generation_id)
        return running.done() or (stream is not None and stream.cancel_requested == record.cancel_requested)

    await wait_for_condition(heard)
    worker.hooks.release.set()
    async with asyncio.timeout(10):
        await running


async def test_a_cancel_arriving_while_on_start_runs_wins(worker: InProcessWorker) -> None:
    session_id = new_session_id()
    generation_id = await accepted(worker.store, session_id)
    running = await held_while(worker, session_id, generation_id)

    await worker.store.request_cancel(session_id, generation_id, "requested")

    await heard_or_ended(worker, generation_id, running)
    record = await worker.store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.CANCELLED
    assert await event_types(worker.store, session_id) == ["generation.started", "generation.cancelled"]


async def test_an_interrupt_arriving_while_on_start_runs_wins(worker: InProcessWorker) -> None:
    session_id = new_session_id()
    generation_id = await accepted(worker.store, session_id)
    running = await held_while(worker, session_id, generation_id)

    urgent = await accepted(worker.store, session_id, policy="interrupt")

    await heard_or_ended(worker, generation_id, running)
    record = await worker.store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.CANCELLED
    assert await event_types(worker.store, session_id) == ["generation.started", "generation.cancelled"]
    assert worker.handed_over == [urgent]  # the interrupting generation runs next


def test_a_cancellation_heard_before_the_work_exists_stops_it_when_it_does(worker: InProcessWorker) -> None:
    stream = worker.writer.open(new_session_id(), new_generation_id(), 1, 0)
    try:
        stream.request_cancel("requested")  # heard while the started event was being written
        stopped: list[str] = []
        stream.cancel_with(lambda: stopped.append("stopped"))
        assert stopped == ["stopped"]
    finally:
        worker.writer.close_stream(stream)


async def test_a_generation_whose_output_cannot_be_written_fails_and_the_session_goes_on(
    worker: InProcessWorker,
) -> None:
    session_id = new_session_id()
    generation_id = await accepted(worker.store, session_id)
    waiting = await accepted(worker.store, session_id)
    worker.hooks.unwritable = True
    async with asyncio.timeout(10):
        await worker.job(session_id, generation_id)
    record = await worker.store.generation(generation_id)
    assert record is not None
    assert record.status is GenerationStatus.FAILED
    assert record.error is not None
    assert record.error["type"] == "internal_error"
    assert worker.handed_over == [waiting]  # the next generation of the session runs
    assert await event_types(worker.store, session_id) == ["generation.started", "generation.failed"]
