"""The worker's lifelong tasks (its flusher, heartbeat and cancellation listener) are watched: one that ends,
which only a bug can make happen, stops the worker rather than leave it taking jobs without it."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from worker.main import _watch


async def test_a_lifelong_task_that_ends_stops_the_worker_and_says_which() -> None:
    stopped = asyncio.Event()

    async def runs() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise ZeroDivisionError(
            "integer modulo by zero"
        )  # as the cancellation listener once did on a cluster

    running = asyncio.create_task(runs(), name="heartbeat")
    failing = asyncio.create_task(fails(), name="cancel-listener")
    with capture_logs() as logs:
        _watch([running, failing], stopped.set)
        async with asyncio.timeout(5):
            await stopped.wait()
    assert [(log["event"], log["task"]) for log in logs] == [("background_task_ended", "cancel-listener")]
    assert "integer modulo by zero" in logs[0]["error"]
    assert not running.done()
    running.cancel()


async def test_tasks_cancelled_as_the_worker_stops_stop_nothing() -> None:
    calls: list[str] = []

    async def runs() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(runs(), name="stream-writer")
    with capture_logs() as logs:
        _watch([task], lambda: calls.append("stop"))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # returns after the task's own callbacks ran
    assert calls == []
    assert logs == []
