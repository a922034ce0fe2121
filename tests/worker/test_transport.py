"""The worker's HTTP/1.1 transport, under the official openai client, against real HTTP servers on loopback:
what a stream delivers however the server frames and cuts it, how each failure reaches the generation (as
openai's own errors, then the worker's failure types), keep-alive, and TLS. The chunked coding and response
heads are also checked on their own, cut anywhere, against h11's reading of the same bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx2
import openai
import pytest
import trustme
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfan.contract.events import FailureType
from tokenfan.runtime.settings import Settings
from worker.chunks import ContentPiece, FinishPiece, ReasoningPiece, ToolCallPiece, Update, UsagePiece
from worker.transport import _CHUNKED, BODY, Body, ChunkedDecoder, StreamingTransport, _Connection, parse_head
from worker.upstream import Upstream, UpstreamFailure

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# ------------------------------------------------------------------------------------------------ a scripted server


@dataclass
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader | None = None

    async def client_leaves(self) -> bool:
        """Wait, as a long generation would, until the client closes the connection."""
        assert self.reader is not None
        while await self.reader.read(4096):
            pass
        raise ConnectionResetError("the client left")


Answer = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Server:
    """A raw HTTP/1.1 server whose every answer the test writes (`answer` returns whether to keep the
    connection for another request)."""

    answer: Answer
    context: ssl.SSLContext | None = None
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    closed: asyncio.Queue[str] = field(default_factory=asyncio.Queue)  # how each connection ended
    port: int = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://localhost:{self.port}/v1"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        ending = "server"
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    ending = "client"
                    return
                request = parse_request(head)
                request.reader = reader
                request.body = await reader.readexactly(int(request.headers.get("content-length", "0")))
                self.requests.append(request)
                if not await self.answer(request, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            ending = "client"
        finally:
            writer.close()
            self.closed.put_nowait(ending)


def parse_request(head: bytes) -> Received:
    lines = head.decode().split("\r\n")
    method, target, _ = lines[0].split(" ")
    fields = (line.partition(":") for line in lines[1:] if line)
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    return Received(method, target, headers, b"")


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's transport is used when no proxy is configured: so these tests say, whatever the machine."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer, context: ssl.SSLContext | None = None) -> Server:
        server = Server(answer, context)
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=context)
        server.port = listening.sockets[0].getsockname()[1]
        servers.append(listening)
        return server

    yield start
    for listening in servers:
        listening.close()


# ------------------------------------------------------------------------------------------------ what servers send


def sse(*chunks: dict[str, Any] | str) -> list[bytes]:
    """The events of a stream: each chunk's JSON, or a raw data string such as ``[DONE]``."""
    return [b"data: " + (c if isinstance(c, str) else json.dumps(c)).encode() + b"\n\n" for c in chunks]


def delta(index: int = 0, finish: str | None = None, **members: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": members, "finish_reason": finish}],
    }


USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}  # fmt: skip
STREAM = sse(
    delta(role="assistant", content=""),
    delta(reasoning_content="thinking"),
    delta(content="Hel"),
    delta(content="lo, "),
    delta(content="wörld 🎉"),
    delta(tool_calls=[{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]),
    delta(finish="stop"),
    USAGE,
    "[DONE]",
)
EXPECTED: list[Update] = [
    ReasoningPiece("thinking"),
    ContentPiece("Hel"),
    ContentPiece("lo, "),
    ContentPiece("wörld 🎉"),
    ToolCallPiece(0, "call_1", "f", '{"a"'),
    ToolCallPiece(0, None, None, ": 1}"),
    FinishPiece("stop"),
    UsagePiece({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
]
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


def chunked(payloads: list[bytes], trailer: bytes = b"") -> list[bytes]:
    return [b"%x\r\n%b\r\n" % (len(p), p) for p in payloads if p] + [b"0\r\n" + trailer + b"\r\n"]


async def write_all(writer: asyncio.StreamWriter, pieces: list[bytes]) -> None:
    """Each piece its own write, with the loop turned in between, so that the client reads them apart."""
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0)


def answering(pieces: list[bytes], keep: bool = True) -> Answer:
    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        await write_all(writer, pieces)
        return keep

    return answer


class Collected:
    """A `Taker` that keeps everything, content text as the pieces `updates` would have given."""

    def __init__(self) -> None:
        self.updates_seen: list[Update] = []

    def text(self, text: str) -> None:
        self.updates_seen.append(ContentPiece(text))

    def updates(self, updates: list[Update]) -> None:
        self.updates_seen += updates


def upstream_for(server: Server, http_client: httpx2.AsyncClient | None = None, **env: str) -> Upstream:
    settings = Settings.from_env({"OPENAI_BASE_URL": server.url, "REDIS_URL": "redis://unused", **env})
    return Upstream(settings, http_client=http_client)


async def stream_from(upstream: Upstream) -> list[Update]:
    collected = Collected()
    await upstream.stream(REQUEST, collected)
    return collected.updates_seen


# ------------------------------------------------------------------------------------------------ streams


@pytest.mark.parametrize(
    "cut",
    ["whole", "per_chunk", "per_byte", "head_apart"],
    ids=["all-at-once", "one-chunk-per-read", "byte-by-byte", "head-then-body"],
)
async def test_a_stream_delivers_what_the_server_sent_however_it_is_cut(
    serve: Callable[..., Awaitable[Server]], cut: str
) -> None:
    wire = [SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(STREAM)]
    pieces = {
        "whole": [b"".join(wire)],
        "per_chunk": wire,
        "per_byte": [bytes([b]) for b in b"".join(wire)],
        "head_apart": [wire[0], b"".join(wire[1:])],
    }[cut]
    server = await serve(answering(pieces))
    upstream = upstream_for(server)
    assert await stream_from(upstream) == EXPECTED
    request = server.requests[0]
    assert (request.method, request.target) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer unset"  # openai's own request, headers and all
    assert json.loads(request.body)["stream"] is True
    await upstream.close()


async def test_bodies_framed_by_length_or_by_the_end_of_the_connection_are_read_whole(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    body = b"".join(STREAM)
    by_length = await serve(answering([SSE_HEAD + b"content-length: %d\r\n\r\n" % len(body), body]))
    until_close = await serve(answering([SSE_HEAD + b"\r\n", *STREAM], keep=False))
    for server in (by_length, until_close):
        upstream = upstream_for(server)
        assert await stream_from(upstream) == EXPECTED
        await upstream.close()


async def test_interim_responses_and_chunk_extensions_and_trailers_are_taken_in_stride(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in STREAM) + b"0\r\nx-trailer: 1\r\n\r\n"
    server = await serve(answering([interim + head, body]))
    upstream = upstream_for(server)
    assert await stream_from(upstream) == EXPECTED
    assert await stream_from(upstream) == EXPECTED  # the trailers were read: the connection is clean
    assert server.connections == 1
    await upstream.close()


async def test_a_compressed_stream_is_decoded_by_the_client_and_read_the_same(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    compressed = gzip.compress(b"".join(STREAM))
    head = SSE_HEAD + b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
    server = await serve(answering([head, *chunked([compressed[:7], compressed[7:]])]))
    upstream = upstream_for(server)
    assert await stream_from(upstream) == EXPECTED
    await upstream.close()


async def test_connections_are_kept_and_used_again(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(answering([SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(STREAM)]))
    upstream = upstream_for(server)
    for _ in range(3):
        assert await stream_from(upstream) == EXPECTED
    assert len(server.requests) == 3
    assert server.connections == 1
    await upstream.close()


async def test_a_kept_connection_the_server_closed_meanwhile_is_replaced_without_failing(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    served = 0

    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        nonlocal served
        served += 1
        await write_all(writer, [SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(STREAM)])
        return False  # ... and close it, without saying so (no Connection: close)

    server = await serve(answer)
    upstream = upstream_for(server)
    assert await stream_from(upstream) == EXPECTED
    assert await server.closed.get() == "server"
    assert await stream_from(upstream) == EXPECTED
    assert (served, server.connections) == (2, 2)
    await upstream.close()


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_a_connection_whose_short_response_ended_serves_the_next_request_before_its_first_returns(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A short response (an error status, say) arrives whole, and its connection goes back to the pool in
    the callback that read it, before the task that asked resumes: a request of another task that runs in
    between takes it (as once happened under load: that request then waited out its read timeout).

    The other task is woken by a byte the server writes on a side socket just before the short response:
    the loop reads both in one turn, in that order, so it runs after the response was read and before the
    first task resumes. On both event loops the worker may run on (uvloop is what it runs)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(short_response_then_another_request()) == (b"ok", 1, 2)


async def short_response_then_another_request() -> tuple[bytes, int, int]:
    """What the second request read, and how many connections and requests the server saw."""
    wake, woken = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=woken)
    body = json.dumps({"error": {"message": "busy"}}).encode()
    short = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)

    async def answer(request: Received, response: asyncio.StreamWriter) -> bool:
        if request.target.endswith("first"):
            wake.send(b"!")
            response.write(short)
        else:
            response.write(SSE_HEAD + b"content-length: 2\r\n\r\nok")
        return True

    server = Server(answer)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    transport = StreamingTransport()
    timeout = {"connect": 5.0, "read": 10.0}

    async def second() -> bytes:
        await reader.readexactly(1)
        response = await transport.handle_async_request(
            httpx2.Request("GET", server.url + "/second", extensions={"timeout": timeout})
        )
        return b"".join([piece async for piece in response.stream])  # type: ignore[union-attr]

    try:
        following = asyncio.create_task(second())
        first = await transport.handle_async_request(
            httpx2.Request("GET", server.url + "/first", extensions={"timeout": timeout})
        )
        assert first.status_code == 503
        assert b"".join([piece async for piece in first.stream]) == body  # type: ignore[union-attr]
        return await following, server.connections, len(server.requests)
    finally:
        await transport.aclose()
        listening.close()
        writer.close()
        wake.close()


async def test_connection_close_is_honoured(serve: Callable[..., Awaitable[Server]]) -> None:
    head = SSE_HEAD + b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n"
    server = await serve(answering([head, *chunked(STREAM)]))
    upstream = upstream_for(server)
    assert await stream_from(upstream) == EXPECTED
    assert await server.closed.get() == "client"  # the client closed it once the body ended
    assert await stream_from(upstream) == EXPECTED
    assert server.connections == 2
    await upstream.close()


async def test_tls(serve: Callable[..., Awaitable[Server]]) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    server = await serve(
        answering([SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(STREAM)]), server_context
    )
    client = httpx2.AsyncClient(transport=StreamingTransport(verify=client_context))
    upstream = upstream_for(server, client)
    assert await stream_from(upstream) == EXPECTED
    await upstream.close()
    untrusted = upstream_for(server)  # the system's trust store does not know this authority
    with pytest.raises(UpstreamFailure) as failed:
        await stream_from(untrusted)
    assert failed.value.failure is FailureType.UPSTREAM_DISCONNECTED
    await untrusted.close()


# ------------------------------------------------------------------------------------------------ failures


async def test_an_error_status_reaches_openai_with_its_body(serve: Callable[..., Awaitable[Server]]) -> None:
    body = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
    head = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 2\r\n"
    server = await serve(answering([head + b"content-length: %d\r\n\r\n" % len(body), body]))
    upstream = upstream_for(server)
    with pytest.raises(UpstreamFailure) as failed:
        await stream_from(upstream)
    assert failed.value.failure is FailureType.RATE_LIMITED
    assert failed.value.retry_after == 2.0
    assert failed.value.message == "upstream answered HTTP 429: slow down"
    await upstream.close()


@pytest.mark.parametrize("whole", [True, False], ids=["with-its-head", "read-apart"])
async def test_an_error_inside_the_stream_fails_it_as_an_upstream_error(
    serve: Callable[..., Awaitable[Server]], whole: bool
) -> None:
    events = [*sse(delta(content="a")), b'data: {"error": {"message": "overloaded"}}\n\n']
    wire = [SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(events)]
    server = await serve(answering([b"".join(wire)] if whole else wire))
    upstream = upstream_for(server)
    collected = Collected()
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.stream(REQUEST, collected)
    assert failed.value.failure is FailureType.UPSTREAM_ERROR
    assert failed.value.message == "upstream error: overloaded"
    assert collected.updates_seen == [ContentPiece("a")]
    await upstream.close()


async def test_a_body_cut_short_is_a_disconnection(serve: Callable[..., Awaitable[Server]]) -> None:
    wire = [SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(sse(delta(content="a")))[:-1]]
    server = await serve(answering(wire, keep=False))
    upstream = upstream_for(server)
    collected = Collected()
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.stream(REQUEST, collected)
    assert failed.value.failure is FailureType.UPSTREAM_DISCONNECTED
    assert failed.value.retryable
    assert collected.updates_seen == [ContentPiece("a")]
    await upstream.close()


@pytest.mark.parametrize(
    "wire",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        SSE_HEAD + b"bad header\r\n\r\n",
        SSE_HEAD + b"content-length: 1\r\ncontent-length: 2\r\n\r\n",
        SSE_HEAD + b"transfer-encoding: chunked\r\n\r\nzz\r\n",
        SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n1\r\nab\r\n",
    ],
    ids=["status-line", "header-line", "lengths", "chunk-size", "chunk-end"],
)
async def test_a_malformed_response_is_a_disconnection(
    serve: Callable[..., Awaitable[Server]], wire: bytes
) -> None:
    server = await serve(answering([wire]))
    upstream = upstream_for(server)
    with pytest.raises(UpstreamFailure) as failed:
        await stream_from(upstream)
    assert failed.value.failure is FailureType.UPSTREAM_DISCONNECTED
    assert await server.closed.get() == "client"
    await upstream.close()


async def test_silence_longer_than_the_read_timeout_is_a_timeout(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    release = asyncio.Event()

    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        await write_all(
            writer, [SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(sse(delta(content="a")))[:-1]]
        )
        await release.wait()  # never sends the rest
        return False

    server = await serve(answer)
    upstream = upstream_for(server, TOKENFAN_UPSTREAM_READ_TIMEOUT_SECONDS="0.2")
    collected = Collected()
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.stream(REQUEST, collected)
    assert failed.value.failure is FailureType.UPSTREAM_TIMEOUT
    assert collected.updates_seen == [ContentPiece("a")]
    release.set()
    await upstream.close()


async def test_no_server_is_a_retryable_disconnection(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(answering([]))
    port = server.port
    listening = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    free = listening.sockets[0].getsockname()[1]
    listening.close()
    await listening.wait_closed()
    server.port = free
    upstream = upstream_for(server)
    with pytest.raises(UpstreamFailure) as failed:
        await stream_from(upstream)
    assert failed.value.failure is FailureType.UPSTREAM_DISCONNECTED
    assert failed.value.retryable
    server.port = port
    await upstream.close()


async def test_a_cancelled_stream_closes_its_connection(serve: Callable[..., Awaitable[Server]]) -> None:
    first = asyncio.Event()

    class FirstText(Collected):
        def updates(self, updates: list[Update]) -> None:
            super().updates(updates)
            first.set()

    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        await write_all(
            writer, [SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(sse(delta(content="a")))[:-1]]
        )
        return await request.client_leaves()  # a long generation

    server = await serve(answer)
    upstream = upstream_for(server)
    reading = asyncio.create_task(upstream.stream(REQUEST, FirstText()))
    await first.wait()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert await server.closed.get() == "client"  # the provider learns to stop
    await upstream.close()


@pytest.mark.parametrize("refuses", ["updates", "text"])
async def test_what_the_taker_raises_ends_the_stream_and_comes_out_as_it_is(
    serve: Callable[..., Awaitable[Server]], refuses: str
) -> None:
    """The writer refusing a piece (its attempt was fenced, say) stops the stream at once, and the job sees
    that, not an upstream failure; whether the piece came as updates (the first ones) or as text."""

    class Refusing(Collected):
        def text(self, text: str) -> None:
            if refuses == "text":
                raise LookupError("fenced")

        def updates(self, updates: list[Update]) -> None:
            if refuses == "updates":
                raise LookupError("fenced")

    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        events = sse(*(delta(content=piece) for piece in "abcd"))
        await write_all(writer, [SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(events)[:-1]])
        return await request.client_leaves()

    server = await serve(answer)
    upstream = upstream_for(server)
    with pytest.raises(LookupError, match="fenced"):
        await upstream.stream(REQUEST, Refusing())
    assert await server.closed.get() == "client"
    await upstream.close()


# ------------------------------------------------------------------------------------------------ the client


def test_a_configured_proxy_keeps_openais_aiohttp_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env({"OPENAI_BASE_URL": "https://api.example.com/v1", "REDIS_URL": "redis://x"})
    direct = Upstream(settings)
    assert isinstance(direct.client._client._transport, StreamingTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.com:3128")
    proxied = Upstream(settings)
    assert not isinstance(proxied.client._client._transport, StreamingTransport)
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert isinstance(Upstream(settings).client._client._transport, StreamingTransport)


def test_the_workers_transport_is_the_default_and_openais_own_can_be_asked_for() -> None:
    default = Settings.from_env({"OPENAI_BASE_URL": "https://api.example.com/v1", "REDIS_URL": "redis://x"})
    assert isinstance(Upstream(default).client._client._transport, StreamingTransport)
    settings = Settings.from_env(
        {
            "OPENAI_BASE_URL": "https://api.example.com/v1",
            "REDIS_URL": "redis://x",
            "TOKENFAN_UPSTREAM_TRANSPORT": "openai",
        }
    )
    assert not isinstance(Upstream(settings).client._client._transport, StreamingTransport)


async def test_over_openais_aiohttp_transport_the_same_stream_reads_the_same(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    """The read the worker falls back to (a proxy configured): the body iterated, the same updates."""
    server = await serve(answering([SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(STREAM)]))
    upstream = upstream_for(server, openai.DefaultAioHttpClient())
    assert await stream_from(upstream) == EXPECTED
    events = [*sse(delta(content="a")), b'data: {"error": {"message": "overloaded"}}\n\n']
    failing = await serve(answering([SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(events)]))
    failing_upstream = upstream_for(failing, openai.DefaultAioHttpClient())
    with pytest.raises(UpstreamFailure) as failed:
        await stream_from(failing_upstream)
    assert failed.value.failure is FailureType.UPSTREAM_ERROR
    await failing_upstream.close()
    await upstream.close()


async def test_a_response_body_can_also_be_iterated(serve: Callable[..., Awaitable[Server]]) -> None:
    """What openai, or any httpx2 user, does with a body: iterate it; the worker's sink is only a shortcut."""
    server = await serve(answering([SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n", *chunked(STREAM)]))
    async with httpx2.AsyncClient(transport=StreamingTransport()) as client:
        async with client.stream("GET", server.url) as response:
            assert isinstance(response.extensions[BODY], Body)
            assert b"".join([piece async for piece in response.aiter_raw()]) == b"".join(STREAM)
        response = await client.get(server.url)
        assert response.content == b"".join(STREAM)
    assert server.connections == 1


# ------------------------------------------------------------------------------------------------ pure parts


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A body in the chunked coding (sizes in either case, extensions, trailers) and the payload it carries."""
    payloads = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    wire = b""
    for payload in payloads:
        size = b"%x" % len(payload)
        size = size.upper() if draw(st.booleans()) else size
        extension = draw(st.sampled_from([b"", b";a=b", b';name="v"']))
        wire += size + extension + b"\r\n" + payload + b"\r\n"
    trailers = draw(st.sampled_from([b"", b"x-check: 1\r\n", b"a: 1\r\nb: 2\r\n"]))
    return wire + b"0\r\n" + trailers + b"\r\n", b"".join(payloads)


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(0, 10_000), max_size=10))
def test_the_chunked_coding_cut_anywhere_gives_its_payload_as_h11_reads_it(
    body: tuple[bytes, bytes], cuts: list[int]
) -> None:
    wire, payload = body
    points = sorted(cut % (len(wire) + 1) for cut in cuts)
    decoder = ChunkedDecoder()
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    got = b"".join(piece for cut in pieces for piece in decoder.feed(cut))
    assert decoder.done
    assert decoder.extra == 0
    assert got == payload == h11_payload(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + wire)


class FakePool:
    """Where a connection goes back once its body ended."""

    def __init__(self) -> None:
        self.open: set[object] = set()
        self.kept: list[object] = []

    def put(self, connection: object) -> None:
        self.kept.append(connection)


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(0, 10_000), max_size=10), st.integers(0, 8))
def test_a_delivered_body_cut_anywhere_reaches_its_sink_whole_and_in_order(
    body: tuple[bytes, bytes], cuts: list[int], stop_after: int
) -> None:
    """Reads of whole chunks go to the sink as they are cut (`Body._deliver_whole`), anything else through the
    decoder: the same payload either way, nothing after the piece the sink stopped at, and the connection kept
    once the body ended."""
    wire, payload = body
    points = sorted(cut % (len(wire) + 1) for cut in cuts)
    loop = asyncio.new_event_loop()
    try:
        pool = FakePool()
        connection = _Connection(pool, ("http", "upstream", 80), loop)  # type: ignore[arg-type]
        connection.body = delivering = Body(connection, _CHUNKED, 0, None)
        delivered: list[bytes] = []

        def sink(piece: bytes) -> bool:
            delivered.append(piece)
            return len(delivered) == stop_after

        done = delivering.deliver(sink)
        for a, b in zip([0, *points], [*points, len(wire)], strict=True):
            connection.data_received(wire[a:b])
        assert done.done()
        assert done.exception() is None
        assert pool.kept == [connection]
        got = b"".join(delivered)
        if stop_after and len(delivered) == stop_after:  # the sink had what it wanted: nothing after
            assert payload.startswith(got)
        else:
            assert got == payload
    finally:
        loop.close()


def h11_payload(response: bytes) -> bytes:
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(response)
    payload = b""
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Data):
            payload += event.data
        elif isinstance(event, h11.EndOfMessage | h11.NEED_DATA | h11.PAUSED):
            return payload


def test_bytes_after_the_last_chunk_are_counted_and_malformed_codings_refused() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"1\r\na\r\n0\r\n\r\nHTTP/1.1") == [b"a"]
    assert decoder.done
    assert decoder.extra == len(b"HTTP/1.1")
    for wire in (b"0x1\r\n", b"+1\r\n", b" 1 x\r\n", b"1\r\nab\r\n", b"1_0\r\n", b"g\r\n"):
        with pytest.raises(ValueError, match="chunk"):
            ChunkedDecoder().feed(wire)


def test_response_heads() -> None:
    parsed = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-A:  b \r\n\r\nrest")
    assert parsed is not None
    head, end = parsed
    assert (head.status, head.reason, head.http_version) == (200, b"OK", b"HTTP/1.1")
    assert head.headers == [(b"Content-Type", b"text/event-stream"), (b"X-A", b"b")]
    assert b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-A:  b \r\n\r\nrest"[end:] == b"rest"
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-") is None
    lf_only = parse_head(b"HTTP/1.0 204 No Content\nA: b\n\n")
    assert lf_only is not None
    assert (lf_only[0].status, lf_only[0].headers) == (204, [(b"A", b"b")])
    for bad in (b"HTTP/2 200 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n folded\r\n\r\n"):
        with pytest.raises(ValueError, match=r"status line|header line"):
            parse_head(bad)
