"""The WebSocket relay: ``/v1/sessions/{session_id}/stream[?after=<offset>]`` and ``/v1/stream``.

A subscription is validated, caught up from Redis (pages, each `send` awaited, so a slow client slows only
its own catch-up), then joined to the session's shared feed (`api.live.feed`), which writes live frames to
every in-sync subscriber at once. Errors close a single-session connection with the code of the
`tokenfan.contract.errors` class that describes them, and reach a multi-session connection as ``error`` frames
(docs/PROTOCOL.md lists both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Origin

from api.live.feed import LiveBus
from api.live.frames import close_reason
from api.relay.connection import Connection
from api.relay.metrics import RelayMetrics
from tokenfan.contract.errors import (
    InvalidOffset,
    InvalidRequest,
    InvalidSessionId,
    RateLimited,
    StorageUnavailable,
    TokenfanError,
)
from tokenfan.contract.ids import is_session_id
from tokenfan.runtime.auth import Authenticator, Principal, bearer_token
from tokenfan.runtime.metrics import Metrics
from tokenfan.runtime.serving import (
    Lifelong,
    bound_url,
    install_stop_signals,
    settle_collector,
    write_ready_file,
)
from tokenfan.runtime.settings import Settings
from tokenfan.store import Store
from tokenfan.store.boundary import expose_redis_errors

__all__ = ["Relay", "run_relay"]

log = structlog.get_logger("tokenfan.relay")

_STREAM_PATH = re.compile(r"^/v1/sessions/([^/]+)/stream$")
MULTI_SESSION_PATH = "/v1/stream"


@dataclass
class Relay:
    """The relay's shared state: settings, store and live bus, one per process."""

    settings: Settings
    store: Store
    bus: LiveBus
    auth: Authenticator
    connections: set[Connection] = field(default_factory=set)
    per_address: Counter[str] = field(default_factory=Counter)
    metrics: RelayMetrics = field(default_factory=lambda: RelayMetrics(Metrics("relay", enabled=False)))

    def __post_init__(self) -> None:
        self.metrics.count_connections(lambda: len(self.connections))  # len(): atomic for the scrape's thread

    def stats(self) -> dict[str, int]:
        feeds = self.bus.feeds.values()
        return {
            "connections": len(self.connections),
            "sessions": len(self.bus.feeds),
            "subscribers": sum(len(feed.subscribers) for feed in feeds),
            "frames_sent": sum(feed.frames_sent for feed in feeds),
            "largest_write_buffer_bytes": max((c.buffered() for c in self.connections), default=0),
        }

    async def handle(self, websocket: ServerConnection) -> None:
        assert websocket.request is not None
        multiplexed = urlsplit(websocket.request.path).path == MULTI_SESSION_PATH
        connection = Connection(self, websocket, multiplexed=multiplexed)
        address = _address(websocket)
        self.connections.add(connection)
        self.per_address[address] += 1
        try:
            principal = connection.principal = self._authenticate(connection)
            if not multiplexed:
                session_id, after = _parse_request(websocket.request)
                assert principal is not None
                principal.require_session(session_id)
                structlog.contextvars.bind_contextvars(session_id=session_id)
                await connection.subscribe(session_id, after, principal.expires_at)
            await self._read(connection)
        except TokenfanError as exc:
            await websocket.close(exc.close_code, close_reason(exc.message))
        except ConnectionClosed:
            pass
        finally:
            self.metrics.closed(websocket)
            self.connections.discard(connection)
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]
            await connection.close_all()

    def _authenticate(self, connection: Connection) -> Principal | None:
        """The connection's principal. A multi-session connection may have none and send a token with
        each subscribe message instead; it must subscribe soon, or it is closed."""
        assert connection.websocket.request is not None
        credential, in_url = _credential(connection.websocket.request)
        if credential is None and connection.multiplexed:
            if not self.auth.insecure_dev_mode:
                _close_if_idle(connection, ANONYMOUS_IDLE_SECONDS)
            return None
        return self.auth.authenticate(credential, in_url=in_url)

    async def _read(self, connection: Connection) -> None:
        """Client messages: ``refresh`` on any connection, subscribe/unsubscribe on a multi-session one
        (pings are answered below us). A client over its message rate is closed with 4429."""
        bucket = _Bucket(self.settings.relay_max_messages_per_second)
        closing: asyncio.Task[None] | None = None
        async for message in connection.websocket:
            if closing is not None:
                continue  # keep reading, or the client's reply to our close would never be seen
            if not bucket.take():
                limit = RateLimited("too many messages: slow down")
                closing = asyncio.create_task(connection.websocket.close(limit.close_code, limit.message))
            else:
                await connection.on_message(message)


#: Connections the kernel holds for the relay to accept (a storm of reconnects arrives at once).
LISTEN_BACKLOG = 4096

#: An anonymous multi-session connection must subscribe (with tokens) within this time.
ANONYMOUS_IDLE_SECONDS = 10.0


def _close_if_idle(connection: Connection, after: float) -> None:
    def check() -> None:
        if not connection.subscribers:
            asyncio.get_running_loop().create_task(
                connection.websocket.close(4401, "no credential, no subscription")
            )

    asyncio.get_running_loop().call_later(after, check)


class _Bucket:
    """A token bucket: `rate` per second, bursts of five seconds' worth."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = self.level = max(1.0, rate * 5)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


def _credential(request: Request) -> tuple[str | None, bool]:
    """``Authorization: Bearer``, else ``?token=`` (browsers cannot set headers on a WebSocket); and
    whether it came in the URL."""
    header = bearer_token(request.headers.get("Authorization"))
    if header is not None:
        return header, False
    tokens = parse_qs(urlsplit(request.path).query).get("token")
    return (tokens[0], True) if tokens else (None, False)


def _address(websocket: ServerConnection) -> str:
    remote = websocket.remote_address
    return str(remote[0]) if remote else "unknown"


def _parse_request(request: Request | None) -> tuple[str, str | None]:
    if request is None:
        raise InvalidRequest("no request")
    url = urlsplit(request.path)
    match = _STREAM_PATH.fullmatch(url.path)
    if match is None:
        raise InvalidRequest("unknown path")
    session_id = match.group(1)
    if not is_session_id(session_id):
        raise InvalidSessionId(
            "session id must be 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    query = parse_qs(url.query, keep_blank_values=True)
    unknown = set(query) - {"after", "token"}
    if unknown:
        raise InvalidRequest("unknown query parameter: only 'after' and 'token' are accepted")
    values = query.get("after")
    if values is not None and len(values) != 1:
        raise InvalidOffset("give 'after' at most once")
    return session_id, values[0] if values else None


def _process_request(relay: Relay) -> object:
    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":  # ready means able to serve: Redis answers
            try:
                await relay.store.ping()
            except StorageUnavailable:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "storage unreachable\n")
            return connection.respond(HTTPStatus.OK, "ready\n")
        if path == "/stats":
            try:
                relay.auth.authenticate(bearer_token(request.headers.get("Authorization"))).require_service()
            except TokenfanError as exc:
                return connection.respond(HTTPStatus(exc.http_status), exc.message + "\n")
            body = json.dumps(relay.stats())
            response = connection.respond(HTTPStatus.OK, body)
            response.headers = Headers(
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return response
        if path != MULTI_SESSION_PATH and _STREAM_PATH.fullmatch(path) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "no such endpoint\n")
        remote = connection.remote_address
        address = str(remote[0]) if remote else "unknown"
        if relay.per_address[address] >= relay.settings.relay_max_connections_per_address:
            return connection.respond(
                HTTPStatus.TOO_MANY_REQUESTS, "too many connections from your address\n"
            )
        return None

    return process_request


def _tracked(connections: set[ServerConnection]) -> type[ServerConnection]:
    """A `ServerConnection` that is in `connections` from its TCP accept to its loss, upgraded or not
    (websockets' server lists only the upgraded ones)."""

    class Tracked(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            connections.add(self)

        def connection_lost(self, exc: Exception | None) -> None:
            connections.discard(self)
            super().connection_lost(exc)

    return Tracked


def _drop_unupgraded(connections: set[ServerConnection]) -> None:
    """On stop, end at once the connections that never became WebSockets. The server's close waits for
    every connection's handler, and one of these would hold it for up to 10 s (websockets' timeouts): a
    client that connected and sent nothing yet, or an HTTP client (a probe) keeping its connection open
    after its answer, which the server waits for it to close. WebSocket subscribers are left to the server's
    own close (1001, going away), which they answer."""
    for connection in list(connections):
        if connection.protocol.state is State.CONNECTING:
            connection.transport.abort()


def _serve_options(relay: Relay, connections: set[ServerConnection]) -> dict[str, Any]:
    """How `websockets.serve` serves the relay; `connections` tracks every connection it accepts."""
    settings = relay.settings
    return {
        "process_request": _process_request(relay),
        "ping_interval": settings.relay_ping_interval_seconds,
        "ping_timeout": settings.relay_ping_timeout_seconds,
        "max_size": settings.relay_max_message_bytes,
        "max_queue": 4,  # unread client messages held per connection: 4 x the largest message at most
        # Browsers always send Origin: only allowlisted ones pass. None admits non-browser clients.
        "origins": None if settings.insecure_dev_mode else [None, *(Origin(o) for o in settings.origins)],
        # Per-message deflate would compress every frame once per subscriber: fan-out pays for it.
        "compression": None,
        # When a relay restarts, all its subscribers reconnect at once: with asyncio's default accept queue
        # (100) the kernel drops the SYNs past it, and each of those clients waits a second or three for its
        # retransmission. The kernel caps this at net.core.somaxconn.
        "backlog": LISTEN_BACKLOG,
        "create_connection": _tracked(connections),
    }


async def run_relay(settings: Settings, *, host: str, port: int, ready_file: str | None = None) -> None:
    """Serve the relay until SIGINT/SIGTERM; port 0 picks a free port; its metrics on `host` when
    ``TOKENFAN_METRICS_PORT`` says. Raises SettingsError when security is not configured (docs/SECURITY.md)."""
    auth = Authenticator.from_settings(settings)
    if settings.insecure_dev_mode:
        log.warning(
            "insecure_dev_mode", detail="every connection is accepted without a credential, from any origin"
        )
    store = Store.from_settings(settings)
    metrics = Metrics("relay", enabled=settings.metrics_port is not None)
    expose_redis_errors(metrics)
    bus = LiveBus.from_settings(store, settings, metrics)
    relay = Relay(settings, store, bus, auth, metrics=RelayMetrics(metrics))
    stop = asyncio.Event()
    lifelong = Lifelong(stop.set)
    bus.start(lifelong.watch)
    ready = metrics.expose(host, settings.metrics_port)
    install_stop_signals(stop.set)
    connections: set[ServerConnection] = set()
    try:
        async with serve(relay.handle, host, port, **_serve_options(relay, connections)) as server:
            settle_collector()
            url = bound_url(next(iter(server.sockets)), "ws")
            log.info("relay_listening", url=url)
            write_ready_file(ready_file, url, role="relay", **ready)
            await stop.wait()
            server.server.close()  # accept no more (the server's own close does it again, harmlessly)
            _drop_unupgraded(connections)
    finally:
        metrics.close()
        await bus.close()
        with contextlib.suppress(Exception):
            await store.close()
    lifelong.check()
