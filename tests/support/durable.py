"""Durable Streams readers of a session (``/ds/sessions/{id}``) that record every event, waiting on events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["DsLongPoller", "DsSseReader", "Frames"]

Frames = list[dict[str, Any]]


class DsLongPoller:
    """Follows a session with ``live=long-poll``, request after request, from the offset the last one gave."""

    def __init__(
        self, api_url: str, session_id: str, *, offset: str = "-1", headers: dict[str, str] | None = None
    ):
        self.url = f"{api_url}/ds/sessions/{session_id}"
        self.offset = offset
        self.headers = headers or {}
        self.frames: Frames = []
        self.requests = 0

    async def follow_until(self, done: Callable[[Frames], bool], timeout: float = 30.0) -> None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
            asyncio.timeout(timeout),
        ):
            while not done(self.frames):
                await self.poll(client)

    async def poll(self, client: httpx.AsyncClient) -> int:
        """One long-poll; returns its status."""
        params = {"offset": self.offset, "live": "long-poll"}
        response = await client.get(self.url, params=params, headers=self.headers)
        self.requests += 1
        assert response.status_code in (200, 204), response.text
        assert "Stream-Closed" not in response.headers  # a session never closes
        if response.status_code == 200:
            assert response.headers["content-type"] == "application/json"
            self.frames.extend(response.json())
        self.offset = response.headers["Stream-Next-Offset"]
        return response.status_code


class DsSseReader:
    """Follows a session with ``live=sse``; `drop_after` frames, it leaves and comes back from its last
    ``streamNextOffset``, as a client that lost its connection does."""

    def __init__(
        self, api_url: str, session_id: str, *, offset: str = "-1", headers: dict[str, str] | None = None
    ):
        self.url = f"{api_url}/ds/sessions/{session_id}"
        self.offset = offset
        self.headers = headers or {}
        self.frames: Frames = []
        self.connections = 0
        self.controls: list[dict[str, Any]] = []

    async def follow_until(
        self, done: Callable[[Frames], bool], *, drop_after: int | None = None, timeout: float = 30.0
    ) -> None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
            asyncio.timeout(timeout),
        ):
            while not done(self.frames):
                limit = None if drop_after is None or self.connections else drop_after
                await self._connection(client, done, limit)

    async def _connection(
        self, client: httpx.AsyncClient, done: Callable[[Frames], bool], limit: int | None
    ) -> None:
        params = {"offset": self.offset, "live": "sse"}
        self.connections += 1
        async with client.stream("GET", self.url, params=params, headers=self.headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            received = 0
            async for event, data in _events(response):
                if event == "data":
                    self.frames.extend(json.loads(data))
                    received += 1
                elif event == "control":
                    control = json.loads(data)
                    assert "streamClosed" not in control  # a session never closes
                    self.controls.append(control)
                    self.offset = control["streamNextOffset"]
                    if done(self.frames) or (limit is not None and received >= limit):
                        return  # leaves mid-stream: the next connection resumes from the offset


async def _events(response: httpx.Response) -> Any:
    event, data = "", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:])
        elif line == "" and event:
            yield event, "\n".join(data)
            event, data = "", []
