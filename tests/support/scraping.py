"""Reading a real process's ``GET /metrics``, and waiting until a number there holds."""

from __future__ import annotations

import time

import httpx

from tests.support.waiting import wait_for_condition
from tokenfan.cli.scrapes import Scrape, parse_scrape


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    return parse_scrape(url, response.text, time.monotonic())


async def value(url: str, name: str, **labels: str) -> float:
    """One number of a process's metrics now (summed over the series `labels` match)."""
    return (await scrape(url)).value(name, **labels)


async def wait_for_value(
    url: str, name: str, expected: float, *, timeout: float = 20.0, **labels: str
) -> None:
    """Wait until the number reaches `expected`, then insist it is exactly that: a counter that overshoots
    counted something twice."""

    async def reached() -> bool:
        return await value(url, name, **labels) >= expected

    await wait_for_condition(reached, timeout=timeout, interval=0.05)
    assert await value(url, name, **labels) == expected, name
