"""One WebSocket connection and the sessions it watches.

A connection holds one `Subscription` per watched session. ``/v1/sessions/{id}/stream`` opens with exactly
one; on ``/v1/stream`` the client adds and removes them with ``subscribe``/``unsubscribe`` messages. Each
subscription catches up in its own task and then lives in its session's feed, which writes to the socket
directly. The connection's write buffer is shared by its subscriptions; when it passes
``relay_max_buffer_bytes`` the connection is slow, and the slow policy applies to each subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from api.live.feed import SessionFeed, write_frames
from api.live.frames import close_reason, control_frame
from api.live.handoff import Handoff
from tokenfan.contract.errors import InvalidRequest, TokenfanError, Unauthorized
from tokenfan.contract.ids import is_session_id
from tokenfan.contract.offsets import parse_offset
from tokenfan.runtime.auth import Principal

if TYPE_CHECKING:
    from api.relay.server import Relay

__all__ = ["SLOW_CONSUMER_CLOSE_CODE", "Connection", "Subscription"]

log = structlog.get_logger("tokenfan.relay")

#: Close code of the `close` slow policy: resume from your last offset (docs/PROTOCOL.md).
SLOW_CONSUMER_CLOSE_CODE = 4008
#: Why a subscription authorized by a session token ends when the token does (close code or error frame 4401).
TOKEN_EXPIRED_REASON = "the token has expired: reconnect with a fresh one and after=<your last offset>"  # noqa: S105
#: Frames larger than this are sent as fragments of this size.
FRAGMENT_BYTES = 16_384


async def fragments(frame: bytes, size: int) -> AsyncIterator[bytes]:
    """`frame` in pieces of at most `size` bytes, never cutting a UTF-8 character in two."""
    start = 0
    while start < len(frame):
        end = min(start + size, len(frame))
        while end < len(frame) and frame[end] & 0xC0 == 0x80:  # a continuation byte: back up
            end -= 1
        yield frame[start:end]
        start = end


class Subscription:
    """One session watched by one connection: a `Subscriber` of the session's feed."""

    __slots__ = ("connection", "feed", "handoff", "recovering", "session_id", "task", "websocket")

    def __init__(self, connection: Connection, session_id: str, handoff: Handoff) -> None:
        self.connection = connection
        self.session_id = session_id
        self.handoff = handoff
        self.websocket: ServerConnection | None = connection.websocket
        self.feed: SessionFeed | None = None
        self.task: asyncio.Task[None] | None = None
        self.recovering = False

    def send_frames(self, frames: list[bytes]) -> None:
        write_frames([self.connection.websocket], frames)

    def is_slow(self) -> bool:
        return self.connection.buffered() > self.connection.max_buffer_bytes

    def on_slow(self) -> None:
        self.connection.on_slow(self)

    def reset(self, reason: str) -> None:
        self.connection.on_reset(self, reason)


class Connection:
    """Drives one WebSocket: its subscriptions, their catch-up tasks, and the slow policy."""

    def __init__(self, relay: Relay, websocket: ServerConnection, *, multiplexed: bool) -> None:
        self.relay = relay
        self.websocket = websocket
        self.multiplexed = multiplexed
        self.subscriptions: dict[str, Subscription] = {}
        self.max_buffer_bytes = relay.settings.relay_max_buffer_bytes
        #: The credential the connection was opened with (None: a multi-session connection without one).
        self.principal: Principal | None = None
        #: When each subscription's credential expires: the subscription ends then (close or error 4401).
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    def buffered(self) -> int:
        transport = self.websocket.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def send(self, frame: bytes) -> None:
        """Write one frame and wait until the socket has room again (back-pressure for catch-up).

        A large frame (a snapshot carries whole texts) goes out as fragments, each waiting for the socket
        to drain, so it never sits in the write buffer at once: memory per connection stays bounded."""
        if len(frame) <= FRAGMENT_BYTES:
            await self.websocket.send(frame, text=True)
        else:
            await self.websocket.send(fragments(frame, FRAGMENT_BYTES), text=True)

    async def drained(self, poll_seconds: float = 0.02) -> None:
        """Wait until the write buffer is down to a quarter of its limit (or the connection closed)."""
        while self.buffered() > self.max_buffer_bytes // 4 and self.websocket.state is State.OPEN:  # noqa: ASYNC110
            await asyncio.sleep(poll_seconds)

    async def subscribe(self, session_id: str, after: str | None) -> Subscription:
        """Validate, then start watching `session_id` after `after`; catching up runs in a task."""
        if not is_session_id(session_id):
            raise InvalidRequest(
                "session id must be 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
            )
        if session_id in self.subscriptions:
            raise InvalidRequest(f"already subscribed to {session_id}")
        offset = parse_offset(after) if after is not None else None
        position = await self.relay.store.check_resume(session_id, offset)
        subscription = Subscription(self, session_id, Handoff(position))
        self.subscriptions[session_id] = subscription
        subscription.task = asyncio.create_task(self._run(subscription))
        return subscription

    async def unsubscribe(self, session_id: str) -> None:
        self.expire_at(session_id, None)
        subscription = self.subscriptions.pop(session_id, None)
        if subscription is not None:
            await self._stop(subscription)

    def expire_at(self, session_id: str, expires_at: float | None) -> None:
        """End the subscription to `session_id` at `expires_at` (unix seconds; None: never), replacing any
        earlier deadline. A stream must not outlive the token that authorized it."""
        handle = self._expiry.pop(session_id, None)
        if handle is not None:
            handle.cancel()
        if expires_at is not None:
            delay = max(0.0, expires_at - time.time())
            loop = asyncio.get_running_loop()
            self._expiry[session_id] = loop.call_later(delay, self._on_expired, session_id)

    def _on_expired(self, session_id: str) -> None:
        self._expiry.pop(session_id, None)
        subscription = self.subscriptions.get(session_id)
        if subscription is not None:
            log.info("subscription_token_expired", session_id=session_id)
            asyncio.get_running_loop().create_task(
                self._fail(subscription, Unauthorized.close_code, TOKEN_EXPIRED_REASON)
            )

    def refresh(self, principal: Principal, session_id: str | None) -> list[str]:
        """Move the deadline of `session_id`'s subscription (None: of every one `principal` may watch) to
        when `principal`'s credential expires; returns the sessions refreshed."""
        if session_id is not None:
            if session_id not in self.subscriptions:
                raise InvalidRequest(f"not subscribed to {session_id}")
            principal.require_session(session_id)
            sessions = [session_id]
        else:
            sessions = [s for s in self.subscriptions if principal.session_id in (None, s)]
            if not sessions and self.subscriptions:
                principal.require_session(next(iter(self.subscriptions)))  # raises: another session's token
        for session in sessions:
            self.expire_at(session, principal.expires_at)
        return sessions

    async def close_all(self) -> None:
        for session_id in list(self.subscriptions):
            await self.unsubscribe(session_id)
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()

    async def _run(self, subscription: Subscription) -> None:
        try:
            subscription.feed = await self.relay.bus.acquire(subscription.session_id)
            await subscription.feed.catch_up(subscription, self.send)
        except ConnectionClosed:
            pass
        except TokenfanError as exc:
            await self._fail(subscription, exc.close_code, exc.message)

    async def _stop(self, subscription: Subscription) -> None:
        if subscription.task is not None and subscription.task is not asyncio.current_task():
            subscription.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await subscription.task
        if subscription.feed is not None:
            subscription.feed.leave(subscription)
            self.relay.bus.release(subscription.feed)
            subscription.feed = None

    async def _fail(self, subscription: Subscription, code: int, reason: str) -> None:
        """End one subscription: the whole connection on a single-session stream, else an error frame."""
        self.expire_at(subscription.session_id, None)
        if not self.multiplexed:
            await self.websocket.close(code, close_reason(reason))
            return
        if self.subscriptions.get(subscription.session_id) is subscription:
            del self.subscriptions[subscription.session_id]
        if subscription.feed is not None:
            subscription.feed.leave(subscription)
            self.relay.bus.release(subscription.feed)
            subscription.feed = None
        with contextlib.suppress(ConnectionClosed):
            await self.send(
                control_frame("error", session_id=subscription.session_id, code=code, reason=reason)
            )

    def on_slow(self, subscription: Subscription) -> None:
        if self.relay.settings.relay_slow_policy == "close":
            log.info("slow_consumer_closed", session_id=subscription.session_id, buffered=self.buffered())
            asyncio.get_running_loop().create_task(
                self.websocket.close(SLOW_CONSUMER_CLOSE_CODE, "too slow: reconnect after your last offset")
            )
            return
        if subscription.recovering:
            return
        log.info("slow_consumer_recovering", session_id=subscription.session_id, buffered=self.buffered())
        subscription.recovering = True
        subscription.task = asyncio.create_task(self._recover(subscription))

    async def _recover(self, subscription: Subscription) -> None:
        try:
            assert subscription.feed is not None
            # Let the client take what is already queued for it before adding a snapshot.
            await self.drained()
            await subscription.feed.recover(subscription, self.send)
        except ConnectionClosed:
            pass
        except TokenfanError as exc:
            await self._fail(subscription, exc.close_code, exc.message)
        finally:
            subscription.recovering = False

    def on_reset(self, subscription: Subscription, reason: str) -> None:
        asyncio.get_running_loop().create_task(self._fail(subscription, 4410, reason))

    async def handle_message(self, message: str | bytes) -> None:
        """One client message on ``/v1/stream`` (docs/PROTOCOL.md, Multi-session connections)."""
        request = _parse_message(message)
        kind, session_id = request["type"], request["session_id"]
        if kind == "subscribe":
            if len(self.subscriptions) >= self.relay.settings.relay_max_subscriptions:
                raise InvalidRequest(f"at most {self.relay.settings.relay_max_subscriptions} subscriptions")
            after = request.get("after")
            if after is not None and not isinstance(after, str):
                raise InvalidRequest("'after' must be an offset string")
            await self.subscribe(session_id, after)
            await self.send(control_frame("subscribed", session_id=session_id))
        else:
            await self.unsubscribe(session_id)
            await self.send(control_frame("unsubscribed", session_id=session_id))


def _parse_message(message: str | bytes) -> dict[str, Any]:
    if isinstance(message, bytes):
        raise InvalidRequest("send text frames holding JSON")
    try:
        request = json.loads(message)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise InvalidRequest("a message must be a JSON object") from None
    if not isinstance(request, dict) or request.get("type") not in ("subscribe", "unsubscribe"):
        raise InvalidRequest("a message is {'type': 'subscribe' | 'unsubscribe', 'session_id': ...}")
    if not isinstance(request.get("session_id"), str):
        raise InvalidRequest("'session_id' must be a string")
    return request
