"""A subscriber that never loses its place: `SessionStream` yields a session's frames and, when the
connection drops, reconnects with backoff and resumes after the last offset it yielded.

    async for frame in SessionStream("ws://127.0.0.1:8001", "demo"):
        if frame["type"] == "delta":
            print(frame.get("content", ""), end="")

When the relay answers that the position cannot be resumed (4410: trimmed or recreated; 4404: unknown),
a stream given ``api_url`` rebuilds by itself: it yields one ``snapshot`` frame holding every generation of
the session (from ``GET /v1/sessions/{id}``) and continues live after the snapshot's offset. Without
``api_url`` it raises `OffsetGone` / `UnknownOffset`. A refused request (bad session id, not authorized)
raises the matching `ClientError`.

A stream authorized by a session token ends when the token expires (close code 4401). Give ``credential``
as a function that returns a fresh token (plain or ``async``) and the stream reconnects with it and resumes
where it was, with no gap; given a string, it raises `Unauthorized` then.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from tokenfan.contract.errors import (
    ClientError,
    Forbidden,
    InvalidRequest,
    OffsetGone,
    RateLimited,
    ServiceUnavailable,
    TokenfanError,
    Unauthorized,
    UnknownOffset,
)
from tokenfan.contract.events import decode_frame

__all__ = ["Credential", "SessionStream"]

#: An API key or session token, or a function returning one (called before every connection).
Credential = str | Callable[[], str | Awaitable[str]]

_FATAL_CLOSE_CODES: dict[int, type[TokenfanError]] = {
    4429: RateLimited,
    4400: InvalidRequest,
    4401: Unauthorized,
    4403: Forbidden,
    4404: UnknownOffset,
    4410: OffsetGone,
}


class SessionStream:
    """Frames of one session, resumed across disconnects. Iterate it once; read `offset` any time."""

    def __init__(
        self,
        relay_url: str,
        session_id: str,
        *,
        after: str | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_attempts: int | None = None,
        api_url: str | None = None,
        credential: Credential | None = None,
    ) -> None:
        self.relay_url = relay_url.rstrip("/")
        self.api_url = api_url.rstrip("/") if api_url else None
        #: An API key or a session token, sent as ``Authorization: Bearer`` (never in the URL), or a
        #: function returning a fresh one before each connection.
        self.credential = credential
        self.session_id = session_id
        self.offset = after
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.connections = 0

    def url(self) -> str:
        query = urlencode({"after": self.offset}) if self.offset else ""
        return f"{self.relay_url}/v1/sessions/{quote(self.session_id, safe='')}/stream" + (
            f"?{query}" if query else ""
        )

    async def _headers(self) -> dict[str, str] | None:
        credential = self.credential
        if callable(credential):
            fresh = credential()
            credential = await fresh if inspect.isawaitable(fresh) else fresh
        return {"Authorization": f"Bearer {credential}"} if credential else None

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        failures = 0
        refused_fresh = False  # a credential just fetched was refused before any frame: do not loop
        while True:
            try:
                async with connect(
                    self.url(),
                    max_size=None,
                    compression=None,
                    additional_headers=await self._headers(),
                ) as websocket:
                    self.connections += 1
                    failures = 0
                    async for message in websocket:
                        frame = decode_frame(message)
                        self.offset = frame["offset"]
                        refused_fresh = False
                        yield frame
            except ConnectionClosed as closed:
                action = self._after_close(closed, refused_fresh)
                if action == "rebuild":
                    yield await self._rebuild()
                    continue
                if action == "now":
                    refused_fresh = True  # the token expired: reconnect at once with a fresh one
                    continue
            except InvalidStatus as exc:
                if 400 <= exc.response.status_code < 500:
                    raise ClientError(
                        f"relay refused the connection: HTTP {exc.response.status_code}"
                    ) from None
            except (OSError, InvalidHandshake, TimeoutError):
                pass
            failures += 1
            if self.max_attempts is not None and failures > self.max_attempts:
                raise ServiceUnavailable(f"relay unreachable after {self.max_attempts} attempts")
            delay = min(self.max_backoff, self.min_backoff * 2 ** min(failures - 1, 10))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    def _after_close(self, closed: ConnectionClosed, refused_fresh: bool) -> str:
        """What to do once the relay closed the connection: ``rebuild`` from a snapshot, reconnect ``now``
        (with a fresh credential) or after a ``backoff``; raises for a refusal that retrying cannot fix."""
        code = closed.rcvd.code if closed.rcvd is not None else None
        if code in (4404, 4410) and self.api_url is not None:
            return "rebuild"
        if code == 4401 and callable(self.credential) and not refused_fresh:
            return "now"
        if code in _FATAL_CLOSE_CODES:
            reason = closed.rcvd.reason if closed.rcvd is not None else ""
            raise _FATAL_CLOSE_CODES[code](reason or f"closed with {code}") from None
        return "backoff"

    async def _rebuild(self) -> dict[str, Any]:
        """Our position is lost: take the session's snapshot and continue after its offset."""
        headers = await self._headers()
        async with httpx.AsyncClient(base_url=str(self.api_url), timeout=30, headers=headers) as client:
            response = await client.get(f"/v1/sessions/{quote(self.session_id, safe='')}")
        if response.status_code == 404:
            self.offset = None  # the session is gone entirely: start over from whatever comes
            return {"type": "snapshot", "offset": None, "session_id": self.session_id, "generations": []}
        response.raise_for_status()
        snapshot = response.json()
        self.offset = snapshot["offset"]
        return {"type": "snapshot", "reason": "offset_gone", **snapshot}
