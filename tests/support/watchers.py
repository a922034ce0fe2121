"""WebSocket subscribers that record every frame and wait on frames, never on time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.delivery import transcript_of
from tests.support.requests import accept, bearer, user_message
from tokenfan.client.transcript import Transcript


def stream_url(relay_url: str, session_id: str, after: str | None = None) -> str:
    query = f"?{urlencode({'after': after})}" if after is not None else ""
    return f"{relay_url}/v1/sessions/{session_id}/stream{query}"


def http_url(ws_url: str) -> str:
    """The plain-HTTP base of a relay (for /healthz and /stats)."""
    return "http://" + ws_url.removeprefix("ws://")


class Watcher:
    """One WebSocket subscriber that records every frame it receives."""

    def __init__(self, relay_url: str, session_id: str) -> None:
        self.relay_url = relay_url
        self.session_id = session_id
        self.frames: list[dict[str, Any]] = []
        self.connection: ClientConnection | None = None
        self.connections = 0

    @property
    def last_offset(self) -> str | None:
        return self.frames[-1]["offset"] if self.frames else None

    async def connect(self, after: str | None = None, *, credential: str | None = None) -> Watcher:
        headers = {"Authorization": f"Bearer {credential}"} if credential else None
        self.connection = await connect(
            stream_url(self.relay_url, self.session_id, after), max_size=None, additional_headers=headers
        )
        self.connections += 1
        return self

    async def receive_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> None:
        """Record frames until `done(frames)` holds. A timeout is a test failure, not a pause."""
        assert self.connection is not None
        async with asyncio.timeout(timeout):
            while not done(self.frames):
                self.frames.append(json.loads(await self.connection.recv()))

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    def transcript(self) -> Transcript:
        """The frames received so far, assembled (raises on a gap, a duplicate or a bad checksum)."""
        return transcript_of(self.frames)


def finished(*generation_ids: str) -> Callable[[list[dict[str, Any]]], bool]:
    """A `receive_until` condition: every named generation reached a terminal event."""
    terminal = {"generation.completed", "generation.failed", "generation.cancelled"}

    def done(frames: list[dict[str, Any]]) -> bool:
        ended = {frame["generation_id"] for frame in frames if frame["type"] in terminal}
        return all(generation_id in ended for generation_id in generation_ids)

    return done


async def close_reason(url: str, *, timeout: float = 10.0, **connect_options: Any) -> tuple[int, str]:
    """Connect (with `connect_options`: headers, origin…) and return the (code, reason) the relay closes
    with; a frame received instead, or an end without a close frame, fails the test."""
    async with asyncio.timeout(timeout), connect(url, **connect_options) as websocket:
        try:
            frame = await websocket.recv()
        except ConnectionClosed as closed:
            received = closed.rcvd
        else:
            raise AssertionError(f"the relay sent a frame instead of closing: {frame!r}")
    assert received is not None, "the connection ended without a close frame"
    return received.code, received.reason


async def handshake_refusal(url: str, **connect_options: Any) -> int:
    """Open a WebSocket expecting the relay to refuse the HTTP handshake; return the HTTP status."""
    from websockets.exceptions import InvalidStatus

    try:
        async with asyncio.timeout(10):
            websocket = await connect(url, **connect_options)
    except InvalidStatus as refused:
        return refused.response.status_code
    await websocket.close()
    raise AssertionError(f"the relay accepted {url}")


class MultiWatcher:
    """One multi-session connection (``/v1/stream``) that records every message it receives."""

    def __init__(self, relay_url: str) -> None:
        self.relay_url = relay_url
        self.messages: list[dict[str, Any]] = []
        self.connection: ClientConnection | None = None

    async def connect(self) -> MultiWatcher:
        self.connection = await connect(f"{self.relay_url}/v1/stream", max_size=None)
        return self

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        assert self.connection is not None
        await self.connection.send(json.dumps(message) if isinstance(message, dict) else message)

    async def subscribe(self, session_id: str, after: str | None = None) -> dict[str, Any]:
        """Subscribe and wait for the answer (``subscribed`` or ``error``), which is returned."""
        request: dict[str, Any] = {"type": "subscribe", "session_id": session_id}
        if after is not None:
            request["after"] = after
        return await self.request(request)

    async def unsubscribe(self, session_id: str) -> dict[str, Any]:
        return await self.request({"type": "unsubscribe", "session_id": session_id})

    async def request(self, message: dict[str, Any] | str | bytes, timeout: float = 10.0) -> dict[str, Any]:
        """Send one message and return the next control message (one without an offset) that follows."""
        start = len(self.messages)
        await self.send(message)
        await self.receive_until(lambda got: any("offset" not in m for m in got[start:]), timeout)
        return next(m for m in self.messages[start:] if "offset" not in m)

    async def receive_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> None:
        assert self.connection is not None
        async with asyncio.timeout(timeout):
            while not done(self.messages):
                self.messages.append(json.loads(await self.connection.recv()))

    def frames(self, session_id: str, since: int = 0) -> list[dict[str, Any]]:
        """The event frames of one session among the messages from index `since` on."""
        return [m for m in self.messages[since:] if "offset" in m and m.get("session_id") == session_id]

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


class CredentialWatcher(Watcher):
    """A `Watcher` whose credential travels as ``?token=`` (as a browser sends it) or as a header."""

    async def connect_with(
        self, *, query_token: str | None = None, header: str | None = None, after: str | None = None
    ) -> CredentialWatcher:
        query = {key: value for key, value in (("after", after), ("token", query_token)) if value is not None}
        url = f"{self.relay_url}/v1/sessions/{self.session_id}/stream"
        if query:
            url += "?" + urlencode(query)
        self.connection = await connect(
            url, max_size=None, additional_headers=bearer(header) if header else None
        )
        self.connections += 1
        return self


class CredentialMultiWatcher(MultiWatcher):
    """A `MultiWatcher` opened with a credential (header or ``?token=``), or with none."""

    async def connect_with(
        self, *, header: str | None = None, query_token: str | None = None
    ) -> CredentialMultiWatcher:
        url = f"{self.relay_url}/v1/stream"
        if query_token is not None:
            url += "?" + urlencode({"token": query_token})
        self.connection = await connect(
            url, max_size=None, additional_headers=bearer(header) if header else None
        )
        return self


async def completed_session(relay_url: str, api: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    """One completed generation in `session_id`, paced so that coalescing leaves many delta frames to resume
    between; its frames as a live single-session watcher got them.

    The tokens come 8 ms apart, past the worker's 5 ms flush window, so each is usually a frame of its own. A
    busy machine can stall the upstream for tens of milliseconds, after which it sends what it owes at once
    (its schedule is absolute) and those tokens share a frame: at 400 tokens/s that left 3 deltas of 30 tokens
    now and then; at this pace a stall must last most of the generation to leave fewer than 4."""
    watcher = await Watcher(relay_url, session_id).connect()
    try:
        generation_id = await accept(api, session_id, user_message("resume me", {"tokens": 16, "rate": 120}))
        await watcher.receive_until(finished(generation_id))
    finally:
        await watcher.close()
    assert len(watcher.frames) >= 6
    return watcher.frames
