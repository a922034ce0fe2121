"""The worker's HTTP/1.1 transport for the openai client: a streamed body handed to its reader as it arrives.

The openai client takes any httpx2 transport (``http_client=``). Through its aiohttp transport, every chunk of
a streamed completion wakes the generation's task, which climbs four async iterators (aiohttp's stream
reader, openai's adapter, httpx2's bound stream, the worker's own) to reach its bytes; at a model's pace every
token is a chunk of its own, and at 500 concurrent generations that was about half of what a worker spent per
token (docs/BENCHMARKS.md). This transport speaks HTTP/1.1 itself, on asyncio protocols, and lets the reader
of a response take its body inside the connection's own callback (`Body.deliver`): no task wakes per chunk,
and one turn of the event loop that finds many connections readable serves them all.

Everything else stays the openai client's: it builds and authenticates the request, checks the status, reads
error bodies (through `Body`'s ordinary async iteration) and raises its own errors, mapping this transport's
(httpx2's own classes: ``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``, ``ReadError``,
``RemoteProtocolError``) to ``APIConnectionError`` and ``APITimeoutError`` as it does any transport's.

What it speaks: HTTP/1.1 over TCP or TLS; keep-alive, with idle connections kept per origin for
`KEEPALIVE_SECONDS`; bodies framed by the chunked transfer coding, by ``Content-Length`` or by the end of the
connection; interim (1xx) responses skipped. Not proxies (with one configured the worker keeps openai's
aiohttp transport), nor HTTP/2. A request whose connection was reused and closed before a single byte of
the response came back (the server had timed it out meanwhile) is sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Final, cast

import httpx2

__all__ = ["BODY", "KEEPALIVE_SECONDS", "Body", "ChunkedDecoder", "StreamingTransport", "parse_head"]

#: The response extension holding the `Body` (``response.extensions[BODY]``).
BODY: Final = "tokenfan.body"
#: How long an idle connection is kept for the next request to its origin (httpx's default).
KEEPALIVE_SECONDS: Final = 5.0
_MAX_IDLE_PER_ORIGIN: Final = 100
_MAX_HEAD: Final = 65_536
_MAX_LINE: Final = 8_192
#: After the reader has what it wanted (``[DONE]``), how long the rest of the body may take to arrive
#: before the connection is closed rather than kept.
_DRAIN_SECONDS: Final = 1.0
#: In iteration mode, bytes buffered before the connection stops reading (and below which it resumes).
_HIGH_WATER: Final = 262_144
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HEX: Final = b"0123456789abcdefABCDEF"
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,8})\r\n")

Origin = tuple[str, str, int]
Sink = Callable[[bytes], bool]

# Body framings, and the chunked decoder's states: ints, compared on every chunk.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2
_SIZE, _DATA, _DATA_END, _TRAILER = 0, 1, 2, 3


class _Head:
    """A response's status line and headers."""

    __slots__ = ("headers", "http_version", "reason", "status")

    def __init__(self, http_version: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]):
        self.http_version = http_version
        self.status = status
        self.reason = reason
        self.headers = headers

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]

    def tokens(self, name: bytes) -> list[bytes]:
        """The comma-separated tokens of every `name` header, lowercased."""
        return [t.strip().lower() for value in self.values(name) for t in value.split(b",") if t.strip()]


def parse_head(buffer: bytes) -> tuple[_Head, int] | None:
    """The response head at the start of `buffer` and where it ends, or None while it is incomplete.
    Raises ValueError for a head that is not HTTP/1.x."""
    found = _HEAD_END.search(buffer)
    if found is None:
        if len(buffer) > _MAX_HEAD:
            raise ValueError("response head too long")
        return None
    lines = buffer[: found.start()].split(b"\n")
    version, _, rest = lines[0].rstrip(b"\r").partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in b" \t":
            raise ValueError(f"malformed header line: {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return _Head(version, int(code), reason.strip(), headers), found.end()


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 16 or size.translate(None, _HEX):
        raise ValueError(f"malformed chunk size: {line[:80]!r}")
    return int(size, 16)


class ChunkedDecoder:
    """The chunked transfer coding (RFC 9112, section 7.1), fed bytes as they arrive: the payload each feed
    completes. `done` once the last chunk and its trailers are read; `extra`: how many bytes came after."""

    __slots__ = ("_left", "_rest", "_state", "done", "extra", "idle")

    def __init__(self) -> None:
        self.idle = True  # between two chunks, holding nothing: the next byte starts a chunk's size line
        self.done = False
        self.extra = 0
        self._state = _SIZE
        self._left = 0
        self._rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Raises ValueError for bytes that are not the chunked coding."""
        if self._state == _SIZE and not self._rest:
            # The common read at a model's pace: exactly one whole chunk (one token's event).
            found = _SIZE_LINE.match(data)
            if found is not None:
                start = found.end()
                end = start + int(found.group(1), 16)
                if end + 2 == len(data) and end > start and data.endswith(b"\r\n"):
                    return [data[start:end]]
        return self._feed(data)

    def _feed(self, data: bytes) -> list[bytes]:
        self.idle = False  # until this read is decoded (and for good if it is not the chunked coding)
        if self._rest:
            data, self._rest = self._rest + data, b""
        pieces: list[bytes] = []
        at, end = 0, len(data)
        while at < end and not self.done:
            if self._state == _DATA:
                take = min(self._left, end - at)
                pieces.append(data[at : at + take] if take != end else data)
                at += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
                continue
            newline = data.find(b"\n", at)
            if newline < 0:
                if end - at > _MAX_LINE:
                    raise ValueError("chunked coding line too long")
                self._rest = data[at:]
                break
            line = data[at : newline - 1 if data[newline - 1 : newline] == b"\r" else newline]
            at = newline + 1
            self._line(line)
        if self.done:
            self.extra += end - at
        self.idle = self._state == _SIZE and not self._rest and not self.done
        return pieces

    def _line(self, line: bytes) -> None:
        if self._state == _SIZE:
            self._left = _chunk_size(line)
            self._state = _DATA if self._left else _TRAILER
        elif self._state == _DATA_END:
            if line:
                raise ValueError("chunk data longer than its size")
            self._state = _SIZE
        elif not line:  # a blank line ends the trailer section, and the body
            self.done = True


class Body(httpx2.AsyncByteStream):
    """The body of one response: iterated (``async for``: what openai does with an error body, and what any
    other reader does), or delivered to a sink as it arrives (`deliver`: what the worker does with a stream)."""

    def __init__(self, connection: _Connection, framing: int, length: int, read_timeout: float | None):
        self._connection = connection
        self._loop = connection.loop
        self._framing = framing
        self._left = length  # framing _LENGTH: bytes still to come
        self._chunked = ChunkedDecoder() if framing == _CHUNKED else None
        self.ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._sink: Sink | None = None
        self._delivered: asyncio.Future[None] | None = None
        self._stopped = False  # the sink has what it wanted: the rest is read only to reuse the connection
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = read_timeout
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        if read_timeout is not None:
            self._timer = self._loop.call_at(self._last + read_timeout, self._check_timeout)

    # --- the connection's side

    def feed(self, data: bytes) -> None:
        """Bytes from the connection (in its callback)."""
        self._last = self._loop.time()
        chunked = self._chunked
        if chunked is not None:
            if chunked.idle and self._sink is not None and not self._stopped:
                data = self._deliver_whole(data)
                if not data:
                    return
            try:
                pieces = chunked.feed(data)
            except ValueError as exc:
                self._fail(httpx2.RemoteProtocolError(str(exc)), abort=True)
                return
            ended, extra = chunked.done, chunked.extra
        elif self._framing == _LENGTH:
            pieces = [data[: self._left] if len(data) > self._left else data]
            extra = max(0, len(data) - self._left)
            self._left -= len(pieces[0])
            ended = not self._left
        else:
            pieces, ended, extra = [data], False, 0
        if pieces:
            self._take(pieces)
        if ended and self._error is None:
            self.end(reusable=not extra)

    def _deliver_whole(self, data: bytes) -> bytes:
        """The common read at a model's pace, one or more whole chunks: each handed to the sink as it is cut,
        with no list in between. Returns what is left for the decoder (b"" for nothing): the last chunk, an
        incomplete or extended one, or what follows once the sink has what it wanted."""
        sink = self._sink
        assert sink is not None
        at, end, match = 0, len(data), _SIZE_LINE.match
        while (found := match(data, at)) is not None:
            start = found.end()
            stop = start + int(found.group(1), 16)
            if stop == start or stop + 2 > end or not data.startswith(b"\r\n", stop):
                break
            at = stop + 2
            try:
                stopped = sink(data[start:stop])
            except Exception as exc:  # the sink's own failure: it ends the response, and reaches the reader
                self._sink_failed(exc)
                return b""
            if stopped:
                self._stopped = True
                self._resolve()
                break
            if at == end:
                return b""
        return data[at:] if at else data

    def lost(self, exc: BaseException | None) -> None:
        """The connection closed before the body ended: its end, when the body runs until then."""
        if self._framing == _UNTIL_CLOSE and exc is None:
            self.end(reusable=False)
        else:
            message = "peer closed connection without sending complete message body"
            self._fail(httpx2.ReadError(f"{message} ({exc})") if exc else httpx2.RemoteProtocolError(message))

    def _take(self, pieces: list[bytes]) -> None:
        sink = self._sink
        if sink is None:
            for piece in pieces:
                if piece:
                    self._chunks.append(piece)
                    self._buffered += len(piece)
            if self._buffered > _HIGH_WATER:
                self._connection.pause_reading()
            self._wake()
            return
        if self._stopped:
            return
        for piece in pieces:
            try:
                stop = sink(piece)
            except Exception as exc:  # the sink's own failure: it ends the response, and reaches the reader
                self._sink_failed(exc)
                return
            if stop:
                self._stopped = True
                self._resolve()
                return

    def _sink_failed(self, exc: Exception) -> None:
        """Even of a body that ended already (all of it may come with the head, before `deliver`): the reader
        learns of it; the connection is closed unless it was handed back already."""
        self._stopped = True
        if self._delivered is not None and not self._delivered.done():
            self._delivered.set_exception(exc)
        if not self.ended and self._error is None:
            self._error = exc
            self._cancel_timers()
            self._connection.abort()

    def end(self, *, reusable: bool) -> None:
        """The body is complete (an empty one as soon as its head is read)."""
        self.ended = True
        self._cancel_timers()
        self._resolve()
        self._wake()
        self._connection.release(self, reusable=reusable)

    def _fail(self, error: BaseException, *, abort: bool = False) -> None:
        if self.ended or self._error is not None:
            return
        self._error = error
        self._cancel_timers()
        delivered = self._delivered
        if delivered is not None and not delivered.done() and not self._stopped:
            delivered.set_exception(error)
        self._wake()
        if abort:
            self._connection.abort()

    def _resolve(self) -> None:
        if self._delivered is not None and not self._delivered.done():
            self._delivered.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _check_timeout(self) -> None:
        """The read timeout, checked once per timeout period rather than rescheduled on every chunk."""
        self._timer = None
        if self.ended or self._error is not None or self._timeout is None:
            return
        now = self._loop.time()
        waiting = (self._sink is not None and not self._stopped) or self._waiter is not None
        if not waiting:
            self._last = now  # nobody is reading: the silence is the reader's, not the server's
        elif now - self._last >= self._timeout:
            self._fail(httpx2.ReadTimeout("the server sent nothing for the read timeout"), abort=True)
            return
        self._timer = self._loop.call_at(self._last + self._timeout, self._check_timeout)

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._drain_timer = None

    # --- the reader's side

    def deliver(self, sink: Sink) -> asyncio.Future[None]:
        """From now on, hand each piece of the body to `sink` as it arrives, in the connection's callback.
        `sink` returns True once it has what it wants. The future is done when it does or the body ends;
        it fails with the transport's error (httpx2's), or with what `sink` raised."""
        if self._sink is not None or self._waiter is not None:
            raise RuntimeError("a body is read once")
        self._sink, self._delivered = sink, self._loop.create_future()
        buffered = list(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if not self.ended:  # an ended body's connection may serve another request, paused or not
            self._connection.resume_reading()
        if buffered:
            self._take(buffered)
        if self._error is not None and not self._delivered.done():
            self._delivered.set_exception(self._error)
        elif self.ended:
            self._resolve()
        return self._delivered

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._sink is not None:
            raise RuntimeError("this body is delivered to a sink")
        while True:
            if self._chunks:
                piece = self._chunks.popleft()
                self._buffered -= len(piece)
                if self._buffered < _HIGH_WATER // 2 and not self.ended:
                    self._connection.resume_reading()
                yield piece
                continue
            if self._error is not None:
                raise self._error
            if self.ended or self._closed:
                return
            self._waiter = self._loop.create_future()
            self._last = self._loop.time()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def aclose(self) -> None:
        """Done with the body: a connection whose body ended is reused; one whose reader stopped at what it
        wanted reads the rest for `_DRAIN_SECONDS` (then it is reused, or closed); any other is closed,
        which is how a server learns to stop generating."""
        if self._closed:
            return
        self._closed = True
        delivered = self._delivered
        if delivered is not None and not delivered.done():
            delivered.cancel()
        if self.ended:
            return
        if self._stopped and self._error is None:
            self._drain_timer = self._loop.call_later(_DRAIN_SECONDS, self._connection.abort)
            return
        self._cancel_timers()
        self._error = self._error or httpx2.ReadError("the body was closed before it ended")
        self._connection.abort()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, its response parsed as it arrives."""

    def __init__(self, pool: _Pool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self.received = False  # any byte of the current response
        self._paused = False
        self._buffer = b""
        self._method = b""
        self._head: asyncio.Future[tuple[_Head, Body]] | None = None
        self._read_timeout: float | None = None
        self._keep_alive = True
        self.body: Body | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.pool.open.add(self)

    def data_received(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            body.feed(data)
            return
        head = self._head
        if head is None or head.done():  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        self.received = True
        self._buffer += data
        try:
            self._parse_head(head)
        except ValueError as exc:
            head.set_exception(httpx2.RemoteProtocolError(str(exc)))
            self.abort()

    def _parse_head(self, waiter: asyncio.Future[tuple[_Head, Body]]) -> None:
        while (parsed := parse_head(self._buffer)) is not None:
            head, end = parsed
            self._buffer, rest = b"", self._buffer[end:]
            if 100 <= head.status < 200:
                if head.status == 101:
                    raise ValueError("the server switched protocols")
                self._buffer = rest  # an interim response: the final one follows
                continue
            body, empty = self._body_for(head)
            self.body = body
            waiter.set_result((head, body))
            if empty:
                body.end(reusable=not rest)
            elif rest:
                body.feed(rest)
            return

    def _body_for(self, head: _Head) -> tuple[Body, bool]:
        """The response's body, framed as RFC 9112 (section 6.3) says, and whether it is empty."""
        close = b"close" in head.tokens(b"connection") or head.http_version == b"HTTP/1.0"
        self._keep_alive = self._keep_alive and not close
        if self._method == b"HEAD" or head.status in (204, 304):
            return Body(self, _LENGTH, 0, None), True
        codings = head.tokens(b"transfer-encoding")
        if codings:
            framing = _CHUNKED if codings[-1] == b"chunked" else _UNTIL_CLOSE
            return Body(self, framing, 0, self._read_timeout), False
        lengths = {value.strip() for value in head.values(b"content-length")}
        if not lengths:
            return Body(self, _UNTIL_CLOSE, 0, self._read_timeout), False
        length = next(iter(lengths))
        if len(lengths) != 1 or not length.isdigit():
            raise ValueError("invalid Content-Length")
        return Body(self, _LENGTH, int(length), self._read_timeout if int(length) else None), not int(length)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.discard(self)
        self.pool.open.discard(self)
        head = self._head
        if head is not None and not head.done():
            reason = f" ({exc})" if exc else ""
            head.set_exception(_Disconnected(f"Server disconnected without sending a response.{reason}"))
        elif self.body is not None:
            self.body.lost(exc)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    async def exchange(
        self, message: bytes, method: bytes, keep_alive: bool, read_timeout: float | None
    ) -> tuple[_Head, Body]:
        """Send one request, and return its response's head and body once the head has arrived."""
        assert self.transport is not None
        self._method, self._read_timeout, self._keep_alive = method, read_timeout, keep_alive
        self.received, self.body = False, None
        waiter: asyncio.Future[tuple[_Head, Body]] = self.loop.create_future()
        self._head = waiter
        try:
            self.transport.write(message)
            async with asyncio.timeout(read_timeout):
                return await waiter
        except TimeoutError:
            self._abandon(waiter)
            raise httpx2.ReadTimeout("no response within the read timeout") from None
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            # A response that came whole (an error status, say) handed the connection back to the pool in
            # the callback that read it, before this task resumed: another task's request may have taken
            # it meanwhile, and its head is not ours to forget (its response would then be refused as
            # bytes nobody asked for, and its reader wait out the read timeout).
            if self._head is waiter:
                self._head = None

    def _abandon(self, waiter: asyncio.Future[tuple[_Head, Body]]) -> None:
        """The request failed or was cancelled: its connection is closed, unless it serves another already."""
        if self._head is waiter:
            self.abort()

    def release(self, body: Body, reusable: bool) -> None:
        """`body` ended: the connection takes the next request, or closes."""
        if self.body is not body:
            return
        self.body = None
        if reusable and self._keep_alive and not self.lost and not self._paused:
            self.pool.put(self)
        else:
            self.close()

    def usable(self, now: float) -> bool:
        return (
            not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < KEEPALIVE_SECONDS
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Disconnected(httpx2.RemoteProtocolError):
    """The connection closed before any byte of the response."""


class _Pool:
    """Idle connections per origin, the most recently used taken first."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._idle: dict[Origin, list[_Connection]] = {}
        self.open: set[_Connection] = set()  # every connection, idle or not

    def take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = self.loop.time()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                connection.reused = True
                return connection
            connection.close()
        return None

    def put(self, connection: _Connection) -> None:
        now = self.loop.time()
        connection.idle_since = now
        idle = self._idle.setdefault(connection.origin, [])
        while idle and (len(idle) >= _MAX_IDLE_PER_ORIGIN or not idle[0].usable(now)):
            idle.pop(0).close()
        idle.append(connection)

    def discard(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        self._idle.clear()
        for connection in list(self.open):
            connection.abort()
        self.open.clear()


def _request_message(request: httpx2.Request, content: bytes) -> tuple[bytes, bool]:
    """The request as sent, and whether it lets the connection be kept."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    keep_alive = True
    for name, value in request.headers.raw:
        lowered = name.lower()
        if lowered == b"transfer-encoding":  # the content was read whole: its length is known
            continue
        if lowered == b"connection" and b"close" in value.lower():
            keep_alive = False
        lines.append(name + b": " + value)
    if request.headers.get("transfer-encoding") is not None:
        lines.append(b"Content-Length: %d" % len(content))
    return b"\r\n".join(lines) + b"\r\n\r\n" + content, keep_alive


class StreamingTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport whose responses carry their `Body` in ``extensions[BODY]``."""

    def __init__(self, *, verify: ssl.SSLContext | bool = True) -> None:
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._pool: _Pool | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        timeouts = request.extensions.get("timeout", {})
        message, keep_alive = _request_message(request, await request.aread())
        method = request.method.encode()
        for fresh in (False, True):
            connection = None if fresh else self._idle_pool().take(origin)
            if connection is None:
                sni = request.extensions.get("sni_hostname")
                connection = await self._connect(origin, timeouts.get("connect"), sni)
            try:
                head, body = await connection.exchange(message, method, keep_alive, timeouts.get("read"))
            except _Disconnected:
                if connection.reused and not fresh:
                    continue  # the server had closed it meanwhile: once more, on a new connection
                raise
            extensions = {"http_version": head.http_version, "reason_phrase": head.reason, BODY: body}
            return httpx2.Response(
                head.status, headers=head.headers, stream=body, request=request, extensions=extensions
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _idle_pool(self) -> _Pool:
        if self._pool is None:
            self._pool = _Pool(asyncio.get_running_loop())
        return self._pool

    async def _connect(self, origin: Origin, within: float | None, sni: str | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        pool = self._idle_pool()
        context = None
        if scheme == "https":
            if self._ssl is None:
                verify = self._verify
                self._ssl = (
                    verify if isinstance(verify, ssl.SSLContext) else httpx2.create_ssl_context(verify)
                )
            context = self._ssl
        try:
            async with asyncio.timeout(within):
                _, connection = await loop.create_connection(
                    lambda: _Connection(pool, origin, loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=(sni or host) if context is not None else None,
                )
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"no connection to {host}:{port} within {within}s") from None
        except OSError as exc:  # ssl.SSLError and socket.gaierror are OSErrors
            raise httpx2.ConnectError(str(exc) or type(exc).__name__) from exc
        return connection

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
