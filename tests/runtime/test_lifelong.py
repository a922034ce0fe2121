"""A server's lifelong tasks (a worker's flusher, heartbeat and cancellation listener; a relay's or API's
presence claims) are watched: one that ends, which only a bug can make happen, stops the process, which then
exits with an error, rather than serve on without it."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from tokenfan.runtime.serving import Lifelong


async def runs() -> None:
    await asyncio.Event().wait()


async def test_a_lifelong_task_that_ends_stops_the_process_which_exits_with_an_error() -> None:
    stopped = asyncio.Event()
    lifelong = Lifelong(stopped.set)

    async def fails() -> None:
        raise ZeroDivisionError(
            "integer modulo by zero"
        )  # as the cancellation listener once did on a cluster

    running = asyncio.create_task(runs(), name="heartbeat")
    failing = asyncio.create_task(fails(), name="cancel-listener")
    with capture_logs() as logs:
        lifelong.watch(running)
        lifelong.watch(failing)
        async with asyncio.timeout(5):
            await stopped.wait()
    assert [(log["event"], log["task"]) for log in logs] == [("background_task_ended", "cancel-listener")]
    assert "integer modulo by zero" in logs[0]["error"]
    assert not running.done()
    running.cancel()
    with pytest.raises(SystemExit, match="cancel-listener ended"):
        lifelong.check()


async def test_tasks_cancelled_as_the_process_stops_stop_nothing() -> None:
    calls: list[str] = []
    lifelong = Lifelong(lambda: calls.append("stop"))
    task = asyncio.create_task(runs(), name="presence")
    with capture_logs() as logs:
        lifelong.watch(task)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # returns after the task's own callbacks ran
    assert calls == []
    assert logs == []
    lifelong.check()  # exits normally: nothing ended
