"""Waiting on conditions with a hard cap, and closing what a test opened whatever its outcome."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar


async def wait_for_condition(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | None = None,
) -> None:
    """Poll `check` until it holds; a timeout is a test failure (saying `message`, when given). The interval
    only paces the polling: for a state nothing announces (an API's status, a key in Redis)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await check():
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        if message is None:
            raise
        raise AssertionError(message) from None


def wait_until(
    check: Callable[[], bool], message: str, *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """`wait_for_condition` for code without an event loop (fixtures, a process probed from outside)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message
        time.sleep(interval)


class Closable(Protocol):
    async def close(self) -> None: ...


ClosableT = TypeVar("ClosableT", bound=Closable)


class Closer:
    """Closes what a test opened, whether it passed or failed: a leaked socket would otherwise surface as a
    ResourceWarning (an error here) in whichever test happens to run the garbage collector."""

    def __init__(self) -> None:
        self._items: list[Closable] = []

    def __call__(self, item: ClosableT) -> ClosableT:
        self._items.append(item)
        return item

    async def close_all(self) -> None:
        for item in reversed(self._items):
            with contextlib.suppress(Exception):
                await item.close()
        self._items.clear()
