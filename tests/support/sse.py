"""SSE subscribers that parse the event stream as the specification says: one over httpx, and one that stops
reading its socket (a slow consumer)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import httpx

from tests.support.delivery import transcript_of
from tests.support.slow import slow_socket
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


class StalledSseReader:
    """An SSE subscriber on a `slow_socket` that reads nothing after sending its request until `resume()`:
    the server's response, once the kernel's small buffers are full, can only pile up in the server. Spoken
    with h11, since no HTTP client lets a test stop reading a response's socket outright."""

    def __init__(self, api_url: str, session_id: str, *, after: str) -> None:
        self.api_url = api_url
        self.target = f"/v1/sessions/{session_id}/events?{urlencode({'after': after})}"
        self.blocks: list[SseBlock] = []
        self.status: int | None = None
        self.ended = False  # the server ended the response
        self._http = h11.Connection(h11.CLIENT)
        self._text = codecs.getincrementaldecoder("utf-8")()
        self._lines = ""
        self._block = SseBlock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def frames(self) -> list[dict[str, Any]]:
        return [block.frame() for block in self.blocks if block.is_event]

    async def open(self) -> StalledSseReader:
        sock = await slow_socket(self.api_url)
        self._reader, self._writer = await asyncio.open_connection(sock=sock)
        host = urlsplit(self.api_url).netloc
        request = h11.Request(method="GET", target=self.target, headers=[("Host", host)])
        self._writer.write(self._http.send(request) + self._http.send(h11.EndOfMessage()))
        await self._writer.drain()
        self._writer.transport.pause_reading()  # type: ignore[attr-defined]
        return self

    def resume(self) -> None:
        assert self._writer is not None
        self._writer.transport.resume_reading()  # type: ignore[attr-defined]

    async def receive_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> None:
        """Read (after `resume`) until `done(frames)` holds or the response ends; a timeout fails the test."""
        assert self._reader is not None
        async with asyncio.timeout(timeout):
            while not done(self.frames) and not self.ended:
                self._http.receive_data(await self._reader.read(65_536))
                self._take_events()

    def _take_events(self) -> None:
        while True:
            event = self._http.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                if isinstance(event, h11.ConnectionClosed):
                    self.ended = True
                return
            if isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self._parse(self._text.decode(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                self.ended = True
                return

    def _parse(self, text: str) -> None:
        self._lines += text
        *lines, self._lines = self._lines.split("\n")
        for line in lines:
            if line:
                self._block.add_line(line)
            elif self._block.is_event or self._block.comments or self._block.retry is not None:
                self.blocks.append(self._block)
                self._block = SseBlock()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
