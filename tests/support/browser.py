"""A real browser for tests: Debian's Chromium, headless, driven by Playwright through its own executable
(Playwright never downloads a browser here), with every console message kept for the test to judge.

A machine without Chromium fails these tests with one line saying how to install it: a browser test that
did not run must never pass.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, ConsoleMessage, Error, Page, async_playwright

__all__ = [
    "CHROMIUM_ARGS",
    "DemoPage",
    "PageConsole",
    "chromium",
    "chromium_path",
    "output_folder",
    "until",
]

#: Headless, no sandbox (tests run as root in containers), and nothing that reaches for the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_INSTALL_HINT = (
    "Chromium is not installed ({path} is missing): run `apt-get install -y chromium` (Debian, as root), "
    "or set TOKENFAN_CHROMIUM to a Chromium binary"
)


def chromium_path() -> str:
    """The browser to drive: ``TOKENFAN_CHROMIUM``, else Debian's. Fails the test when it is missing."""
    path = os.environ.get("TOKENFAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(_INSTALL_HINT.format(path=path), pytrace=False)
    return path


def output_folder() -> Path:
    """Where screenshots go: ``TOKENFAN_TEST_OUTPUT`` (``test-output/`` by default), ``browser/``."""
    folder = Path(os.environ.get("TOKENFAN_TEST_OUTPUT", "test-output")) / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@asynccontextmanager
async def chromium() -> AsyncIterator[BrowserContext]:
    """One headless Chromium with a fresh profile, closed (and its profile removed) on exit."""
    executable = chromium_path()
    profile = tempfile.mkdtemp(prefix="tokenfan-chromium-")
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                yield context
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class PageConsole:
    """Everything a page logged, and the errors it threw. `errors()` is what a test asserts empty."""

    messages: list[tuple[str, str]] = field(default_factory=list)
    thrown: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> Page:
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.thrown.append(str(error)))
        return page

    def _message(self, message: ConsoleMessage) -> None:
        self.messages.append((message.type, message.text))

    def errors(self, *, expected: str | None = None) -> list[str]:
        """Errors logged or thrown, except those matching the regular expression `expected` (the
        browser's own report of a connection a test broke on purpose)."""
        logged = [text for kind, text in self.messages if kind == "error"]
        return [text for text in logged + self.thrown if expected is None or not re.search(expected, text)]


async def until(page: Page, expression: str, *, timeout: float = 30.0, arg: Any = None) -> Any:
    """Wait until the page's `expression` (a function of `arg`) is truthy, and return its value; a
    timeout fails the test. Polls with `evaluate`, which the page's Content-Security-Policy allows
    (Playwright's own waiting compiles strings, which it forbids)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = await page.evaluate(expression, arg)
                if value:
                    return value
                await asyncio.sleep(0.05)  # only paces the polling: the condition is what is awaited
    except TimeoutError:
        raise AssertionError(f"the page never satisfied: {expression}") from None
    except Error as error:
        raise AssertionError(f"the page failed while waiting for {expression}: {error.message}") from None


class DemoPage:
    """The live page at ``/``, driven as a person would (type, click), read through ``window.demo``."""

    def __init__(self, page: Page, console: PageConsole, api_url: str) -> None:
        self.page = page
        self.console = console
        self.api_url = api_url

    async def open(self, session_id: str, key: str | None = None) -> DemoPage:
        """Open the page on `session_id`; with `key`, enter it as the demo backend's and wait for the
        three panes to be live."""
        await self.page.goto(f"{self.api_url}/?session={session_id}")
        await until(self.page, "() => window.demo && demo.queue !== null")
        if key is not None:
            await self.page.fill("#api-key", key)
            await self.page.press("#api-key", "Enter")
            await until(
                self.page, "() => demo.panes.length === 3 && demo.panes.every(p => p.stream.state === 'open')"
            )
        return self

    async def send(self, prompt: str) -> str:
        """Type `prompt`, send it with Ctrl+Enter, and return the id of the generation it queued."""
        known = await self.generation_ids()
        await self.page.fill("#prompt", prompt)
        await self.page.press("#prompt", "Control+Enter")
        ids: list[str] = await until(
            self.page,
            "(known) => { const ids = [...demo.queue.items.keys()].filter(id => !known.includes(id)); return ids.length && ids; }",
            arg=known,
        )
        return ids[0]

    async def generation_ids(self) -> list[str]:
        ids: list[str] = await self.page.evaluate("() => [...demo.queue.items.keys()]")
        return ids

    async def panes(self) -> list[dict[str, Any]]:
        """Each pane's transport, frames, connections, token refreshes and integrity errors."""
        panes: list[dict[str, Any]] = await self.page.evaluate(
            """() => demo.panes.map(pane => ({
                number: pane.number, transport: pane.transport, frames: pane.frames,
                connections: pane.stream.connections, refreshes: pane.stream.refreshes,
                state: pane.stream.state, errors: pane.errors,
            }))"""
        )
        return panes

    async def deltas(self, pane: int, generation_id: str) -> int:
        """How many delta frames of `generation_id` pane number `pane` has received."""
        count: int = await self.page.evaluate(
            "([number, id]) => demo.panes.find(p => p.number === number).frames"
            ".filter(f => f.type === 'delta' && f.generation_id === id).length",
            [pane, generation_id],
        )
        return count

    async def wait_for_deltas(self, pane: int, generation_id: str, count: int) -> None:
        await until(
            self.page,
            "([number, id, count]) => demo.panes.find(p => p.number === number).frames"
            ".filter(f => f.type === 'delta' && f.generation_id === id).length >= count",
            arg=[pane, generation_id, count],
        )

    async def wait_verified(self, generation_id: str, panes: int) -> None:
        """Until `panes` panes show the verified badge on `generation_id`."""
        badges = self.page.locator(f'.generation[data-id="{generation_id}"] .badge.verified')
        await badges.nth(panes - 1).wait_for(timeout=45_000)

    async def screenshot(self, name: str) -> Path:
        path = output_folder() / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path
