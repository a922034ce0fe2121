"""One WebSocket connection and the sessions it watches.

A connection holds one `Subscriber` (the live engine's driver) per watched session, each writing to the
connection through a `WebSocketSink`. ``/v1/sessions/{id}/stream`` opens with exactly one; on ``/v1/stream``
the client adds and removes them with ``subscribe``/``unsubscribe`` messages. The connection's write buffer
is shared by its subscriptions: when it passes ``relay_max_buffer_bytes`` the connection is slow, and the
slow policy applies to each subscription. An ended subscription closes a single-session connection with
its close code, and reaches a multi-session connection as an ``error`` frame (the connection goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from api.live.frames import FrameBatch, close_reason, control_frame
from api.live.subscriber import SLOW_CONSUMER_CLOSE_CODE, SinkClosed, Subscriber
from api.relay.messages import ClientMessage, Invalid, Refresh, Subscribe, Unsubscribe, parse_message
from api.relay.wire import FRAGMENT_BYTES, fragments, send_wire, websocket_wire, write_batch
from tokenfan.contract.errors import InvalidRequest, InvalidSessionId, TokenfanError, Unauthorized
from tokenfan.contract.ids import is_session_id
from tokenfan.contract.offsets import parse_offset
from tokenfan.runtime.auth import Principal

if TYPE_CHECKING:
    from api.relay.server import Relay

__all__ = ["Connection", "WebSocketSink"]

log = structlog.get_logger("tokenfan.relay")


class WebSocketSink:
    """One subscription's side of a connection (`api.live.subscriber.Sink`)."""

    __slots__ = ("buffered", "connection", "deliver", "session_id")

    def __init__(self, connection: Connection, session_id: str) -> None:
        self.connection = connection
        self.session_id = session_id
        # The fan-out calls these two for every subscriber of every live batch, so each is bound once here
        # rather than reached through a method of ours per call (a third of the relay's own work per frame
        # beside the kernel's send was such calls): `Sink.buffered` is the transport's own count, and
        # `Sink.deliver` is `write_batch` on this connection.
        self.buffered: Callable[[], int] = connection.buffered_counter()
        self.deliver: Callable[[FrameBatch], None] = functools.partial(write_batch, connection.websocket)

    async def send(self, frame: bytes) -> None:
        try:
            await self.connection.send(frame)
        except ConnectionClosed:
            raise SinkClosed from None

    async def send_batches(self, batches: list[FrameBatch]) -> None:
        """Catch-up pages in as few writes as fit under a quarter of the connection's buffer limit each (the
        pages of a storm of resumers: a few writes each, not one per frame); a page too large for that goes
        frame by frame."""
        limit = self.connection.max_buffer_bytes // 4
        group: list[FrameBatch] = []
        size = 0
        for batch in batches:
            wire = batch.encoded(websocket_wire)
            if group and size + len(wire) > limit:
                await self._write(group)
                group, size = [], 0
            if len(wire) > limit:
                await self._send_frames(batch.frames)
            else:
                group.append(batch)
                size += len(wire)
        if group:
            await self._write(group)

    async def _write(self, batches: list[FrameBatch]) -> None:
        websocket = self.connection.websocket
        try:
            sent = await send_wire(websocket, [batch.encoded(websocket_wire) for batch in batches])
        except OSError:  # the connection was lost while we waited for it to drain
            raise SinkClosed from None
        if not sent:
            await self._send_frames([frame for batch in batches for frame in batch.frames])
        elif websocket.state is not State.OPEN:
            raise SinkClosed

    async def _send_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self.send(frame)

    async def drained(self) -> None:
        await self.connection.drained()

    def end(self, code: int, reason: str) -> None:
        self.connection.end_subscription(self.session_id, code, reason)


class Connection:
    """Drives one WebSocket: its subscribers and the messages its client sends."""

    def __init__(self, relay: Relay, websocket: ServerConnection, *, multiplexed: bool) -> None:
        self.relay = relay
        self.websocket = websocket
        self.multiplexed = multiplexed
        self.subscribers: dict[str, Subscriber] = {}
        self.max_buffer_bytes = relay.settings.relay_max_buffer_bytes
        #: The credential the connection was opened with (None: a multi-session connection without one).
        self.principal: Principal | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def buffered(self) -> int:
        transport = self.websocket.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def buffered_counter(self) -> Callable[[], int]:
        """`buffered` as one call: the transport's own method once the connection has one."""
        transport = self.websocket.transport
        return transport.get_write_buffer_size if transport is not None else self.buffered

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

    async def subscribe(self, session_id: str, after: str | None, expires_at: float | None) -> Subscriber:
        """Validate, then start watching `session_id` after `after` until `expires_at` (unix seconds)."""
        if not is_session_id(session_id):
            raise InvalidSessionId(
                "session id must be 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
            )
        if session_id in self.subscribers:
            raise InvalidRequest(f"already subscribed to {session_id}")
        offset = parse_offset(after) if after is not None else None
        position = await self.relay.bus.checks.check(session_id, offset)
        subscriber = Subscriber(
            self.relay.bus,
            session_id,
            position,
            WebSocketSink(self, session_id),
            max_buffer_bytes=self.max_buffer_bytes,
            slow_policy=self.relay.settings.relay_slow_policy,
            transport="websocket",
        )
        self.subscribers[session_id] = subscriber
        subscriber.start()
        subscriber.expire_at(expires_at)
        return subscriber

    async def unsubscribe(self, session_id: str) -> None:
        subscriber = self.subscribers.pop(session_id, None)
        if subscriber is not None:
            await subscriber.stop()

    async def close_all(self) -> None:
        for session_id in list(self.subscribers):
            await self.unsubscribe(session_id)

    def end_subscription(self, session_id: str, code: int, reason: str) -> None:
        """A subscriber ended: close a single-session connection (and any slow one: its buffer is shared),
        or tell a multi-session client with an error frame."""
        if not self.multiplexed or code == SLOW_CONSUMER_CLOSE_CODE:
            self._spawn(self.websocket.close(code, close_reason(reason)))
            return
        self.subscribers.pop(session_id, None)
        self._spawn(
            self._send_quietly(control_frame("error", session_id=session_id, code=code, reason=reason))
        )

    # --- client messages (docs/PROTOCOL.md, Multi-session connections and Token expiry)

    async def on_message(self, raw: str | bytes) -> None:
        message: ClientMessage = parse_message(raw, multi_session=self.multiplexed)
        if isinstance(message, Refresh):
            await self._on_refresh(message)
        elif isinstance(message, Invalid):
            # Answered, never ignored: a client whose message went unheeded would wait for nothing.
            await self._error(InvalidRequest(message.reason), message.session_id)
        elif isinstance(message, Subscribe):
            await self._on_subscribe(message)
        else:
            await self._on_unsubscribe(message)

    async def _on_subscribe(self, message: Subscribe) -> None:
        try:
            principal = self._authorize(message)
            limit = self.relay.settings.relay_max_subscriptions
            if len(self.subscribers) >= limit:
                raise InvalidRequest(f"at most {limit} subscriptions")
            await self.subscribe(message.session_id, message.after, principal.expires_at)
            await self.send(control_frame("subscribed", session_id=message.session_id))
        except TokenfanError as exc:
            await self._error(exc, message.session_id)

    async def _on_unsubscribe(self, message: Unsubscribe) -> None:
        await self.unsubscribe(message.session_id)
        await self.send(control_frame("unsubscribed", session_id=message.session_id))

    def _authorize(self, message: Subscribe) -> Principal:
        """A subscribe needs a principal allowed to watch its session: the message's own token, or the
        connection's credential while it lasts."""
        auth = self.relay.auth
        if message.token is not None:
            principal = auth.authenticate(message.token)  # not a URL: an API key may come this way
        elif self.principal is None:
            principal = auth.authenticate(None)  # allowed only in development mode
        elif self.principal.expires_at is not None and self.principal.expires_at <= time.time():
            raise Unauthorized("the connection's token has expired; send a fresh one with 'refresh'")
        else:
            principal = self.principal
        principal.require_session(message.session_id)
        return principal

    async def _on_refresh(self, message: Refresh) -> None:
        """A fresh credential extends the subscriptions it allows past the old one's expiry."""
        try:
            principal = self.relay.auth.authenticate(message.token)  # not a URL: an API key may come so
            refreshed = self._refresh(principal, message.session_id)
            if message.session_id is None:
                self.principal = principal
            for session in refreshed:
                await self.send(
                    control_frame("refreshed", session_id=session, expires_at=principal.expires_at)
                )
            if not refreshed:  # a connection watching nothing yet: its credential for later subscribes
                await self.send(control_frame("refreshed", expires_at=principal.expires_at))
        except TokenfanError as exc:
            await self._error(exc, None)

    def _refresh(self, principal: Principal, session_id: str | None) -> list[str]:
        """Move the deadline of `session_id`'s subscription (None: of every one `principal` may watch) to
        when `principal`'s credential expires; returns the sessions refreshed."""
        if session_id is not None:
            if session_id not in self.subscribers:
                raise InvalidRequest(f"not subscribed to {session_id}")
            principal.require_session(session_id)
            sessions = [session_id]
        else:
            sessions = [s for s in self.subscribers if principal.session_id in (None, s)]
            if not sessions and self.subscribers:
                principal.require_session(next(iter(self.subscribers)))  # raises: another session's token
        for session in sessions:
            self.subscribers[session].expire_at(principal.expires_at)
        return sessions

    async def _error(self, error: TokenfanError, session_id: str | None) -> None:
        extra = {"session_id": session_id} if session_id is not None else {}
        await self.send(control_frame("error", code=error.close_code, reason=error.message, **extra))

    async def _send_quietly(self, frame: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.send(frame)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
