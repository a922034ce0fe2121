"""An SSE subscriber that parses the event stream as the specification says."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.delivery import transcript_of
from tokenfan.client.transcript import Transcript


@dataclass
class SseBlock:
    """What an SSE response carries up to one blank line: an event, comments, and/or a `retry:` field."""

    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def is_event(self) -> bool:
        return bool(self.data)

    def frame(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads("\n".join(self.data))
        return value

    def add_line(self, line: str) -> None:
        """One non-blank line, parsed as the SSE specification says (a leading ':' is a comment)."""
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self.id = value
        elif name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "retry" and value.isdigit():
            self.retry = int(value)


class SseWatcher:
    """One SSE subscriber (``GET /v1/sessions/{id}/events``) that records every block it receives."""

    def __init__(
        self,
        api_url: str,
        session_id: str,
        *,
        after: str | None = None,
        last_event_id: str | None = None,
    ) -> None:
        self.api_url = api_url
        self.session_id = session_id
        self.after = after
        self.last_event_id = last_event_id
        self.blocks: list[SseBlock] = []
        self.response: httpx.Response | None = None
        self._exit = contextlib.AsyncExitStack()
        self._lines: AsyncIterator[str] | None = None

    @property
    def frames(self) -> list[dict[str, Any]]:
        """The frames of every event received so far (``event: error`` included, as the server sent it)."""
        return [block.frame() for block in self.blocks if block.is_event]

    async def open(self) -> httpx.Response:
        """Send the request; the response may be a refusal (check `response.status_code`)."""
        client = await self._exit.enter_async_context(
            httpx.AsyncClient(base_url=self.api_url, timeout=httpx.Timeout(10.0, read=None))
        )
        params = {"after": self.after} if self.after is not None else {}
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id is not None else {}
        self.response = await self._exit.enter_async_context(
            client.stream("GET", f"/v1/sessions/{self.session_id}/events", params=params, headers=headers)
        )
        return self.response

    async def connect(self) -> SseWatcher:
        """Open the stream and check that it is one."""
        response = await self.open()
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"SSE refused with {response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        self._lines = response.aiter_lines()
        return self

    async def refusal(self) -> tuple[int, dict[str, Any]]:
        """Open the stream expecting an HTTP error; return its status and JSON body."""
        response = await self.open()
        if response.status_code == 200:
            raise AssertionError("the SSE request was accepted; it should have been refused")
        await response.aread()
        body: dict[str, Any] = response.json()
        return response.status_code, body

    async def next_block(self) -> SseBlock:
        """The next block; raises AssertionError when the server ends the response first."""
        assert self._lines is not None, "connect() first"
        block = SseBlock()
        started = False
        async for line in self._lines:
            if line == "":
                if started:
                    self.blocks.append(block)
                    return block
                continue
            started = True
            block.add_line(line)
        raise AssertionError("the server ended the event stream")

    async def receive_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> None:
        """Record blocks until `done(frames)` holds. A timeout is a test failure, not a pause."""
        async with asyncio.timeout(timeout):
            while not done(self.frames):
                await self.next_block()

    async def receive_blocks_until(
        self, done: Callable[[list[SseBlock]], bool], timeout: float = 20.0
    ) -> None:
        async with asyncio.timeout(timeout):
            while not done(self.blocks):
                await self.next_block()

    async def close(self) -> None:
        if self._lines is not None and isinstance(self._lines, AsyncGenerator):
            await self._lines.aclose()
        await self._exit.aclose()

    def transcript(self) -> Transcript:
        """The frames received so far, assembled (raises on a gap, a duplicate or a bad checksum)."""
        return transcript_of(self.frames)


class CredentialSseWatcher(SseWatcher):
    """An `SseWatcher` sending extra headers (``Authorization``) and query parameters (``token``)."""

    def __init__(
        self,
        api_url: str,
        session_id: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        after: str | None = None,
        last_event_id: str | None = None,
    ) -> None:
        super().__init__(api_url, session_id, after=after, last_event_id=last_event_id)
        self.headers = headers or {}
        self.params = params or {}

    async def open(self) -> httpx.Response:
        client = await self._exit.enter_async_context(
            httpx.AsyncClient(base_url=self.api_url, timeout=httpx.Timeout(10.0, read=None))
        )
        params = {**self.params, **({"after": self.after} if self.after is not None else {})}
        headers = {**self.headers}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        self.response = await self._exit.enter_async_context(
            client.stream("GET", f"/v1/sessions/{self.session_id}/events", params=params, headers=headers)
        )
        return self.response
