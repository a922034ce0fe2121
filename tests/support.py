"""Test helpers: the system as real processes, and subscribers that wait on frames, not on time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tokenfan.cli.processes import ChildProcess
from tokenfan.cli.simulator import SimulatorConfig, reply_chunks
from tokenfan.client.transcript import Transcript

#: The simulator every test stack runs: full speed (tests that need pacing say so per request).
SIMULATOR = SimulatorConfig(tokens_per_second=0, reply_tokens=48)


def new_session_id() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def expected_text(body: dict[str, Any]) -> str:
    """What the simulator streams for `body` (a generation request), computed without HTTP."""
    return "".join(reply_chunks(body, SIMULATOR))


def user_message(content: str, directive: dict[str, Any] | None = None) -> dict[str, Any]:
    if directive is not None:
        content = f"{content} <<sim {json.dumps(directive)}>>"
    return {"model": "tokenfan-sim", "messages": [{"role": "user", "content": content}]}


@dataclass
class RunningStack:
    """simulator + relay + API + workers as child processes on free ports, against one Redis."""

    redis_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[ChildProcess] = field(default_factory=list)
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tokenfan-test-logs-")))
    simulator_url: str = ""
    relay_url: str = ""
    api_url: str = ""

    @property
    def env(self) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith(("TOKENFAN_", "OPENAI_"))
        }
        env.update(
            REDIS_URL=self.redis_url,
            OPENAI_BASE_URL=f"{self.simulator_url}/v1",
            TOKENFAN_LOG_FORMAT="json",
            TOKENFAN_LOG_LEVEL="info",
            # Security has its own tests (tests/test_security.py, on a stack with keys); elsewhere it is noise.
            TOKENFAN_INSECURE_DEV_MODE="true",
        )
        env.update(self.extra_env)
        return env

    def spawn(self, role: str, args: list[str] | None = None, *, name: str | None = None) -> ChildProcess:
        name = name or f"{role}-{len(self.children)}"
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own copy of the descriptor
            child = ChildProcess(role, args or [], env=self.env, stderr=log, name=name).start()
        self.children.append(child)
        return child

    def start(self, *, workers: int = 1) -> RunningStack:
        simulator = self.spawn(
            "simulator", ["--port", "0", "--tokens-per-second", "0", "--reply-tokens", "48"]
        )
        self.simulator_url = simulator.wait_ready()
        relay = self.spawn("relay", ["--port", "0"], name="relay")
        self.relay_url = relay.wait_ready()
        api = self.spawn("api", ["--port", "0"], name="api")
        self.api_url = api.wait_ready()
        for _ in range(workers):
            self.spawn("worker").wait_ready()
        return self

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def stream_url(relay_url: str, session_id: str, after: str | None = None) -> str:
    query = f"?{urlencode({'after': after})}" if after is not None else ""
    return f"{relay_url}/v1/sessions/{session_id}/stream{query}"


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
        transcript = Transcript()
        for frame in self.frames:
            transcript.apply(frame)
        return transcript


def finished(*generation_ids: str) -> Callable[[list[dict[str, Any]]], bool]:
    """A `receive_until` condition: every named generation reached a terminal event."""
    terminal = {"generation.completed", "generation.failed", "generation.cancelled"}

    def done(frames: list[dict[str, Any]]) -> bool:
        ended = {frame["generation_id"] for frame in frames if frame["type"] in terminal}
        return all(generation_id in ended for generation_id in generation_ids)

    return done


async def close_reason(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """Connect and return the (code, reason) the relay closes with."""
    async with asyncio.timeout(timeout), connect(url) as websocket:
        try:
            frame = await websocket.recv()
        except ConnectionClosed as closed:
            received = closed.rcvd
        else:
            raise AssertionError(f"the relay sent a frame instead of closing: {frame!r}")
    assert received is not None
    return received.code, received.reason


async def accept(client: httpx.AsyncClient, session_id: str, body: dict[str, Any], **kwargs: Any) -> str:
    response = await client.post(f"/v1/sessions/{session_id}/generations", json=body, **kwargs)
    assert response.status_code == 202, response.text
    generation_id: str = response.json()["generation_id"]
    return generation_id


async def completed_session(relay_url: str, api: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    """One completed generation in `session_id`, paced so that coalescing leaves many delta frames to resume
    between; its frames as a live single-session watcher got them."""
    watcher = await Watcher(relay_url, session_id).connect()
    try:
        generation_id = await accept(api, session_id, user_message("resume me", {"tokens": 30, "rate": 400}))
        await watcher.receive_until(finished(generation_id))
    finally:
        await watcher.close()
    assert len(watcher.frames) >= 6
    return watcher.frames


Coverage = list[tuple[str, int]]


def coverage(frames: list[dict[str, Any]]) -> Coverage:
    """The (generation, seq) pairs the event frames carry, in order; a merged delta covers seq_start..seq."""
    covered: Coverage = []
    for frame in frames:
        if "seq" in frame:
            first = int(frame.get("seq_start", frame["seq"]))
            covered += [(frame["generation_id"], seq) for seq in range(first, int(frame["seq"]) + 1)]
    return covered


async def stream_contents(redis: Any, session_id: str) -> tuple[list[str], Coverage]:
    """Every offset the session's stream holds, and the (generation, seq) of each entry, in order."""
    from tokenfan.contract.keys import SessionKeys

    offsets, covered = [], []
    for entry_id, fields in await redis.xrange(SessionKeys(session_id).events):
        offsets.append(f"{fields[b'e'].decode()}:{entry_id.decode()}")
        body = json.loads(fields[b"d"])
        covered.append((body["generation_id"], body["seq"]))
    return offsets, covered


async def assert_exact_delivery(redis: Any, session_id: str, frames: list[dict[str, Any]]) -> None:
    """What a subscriber got is the session's stream: every event once, in order, no gap, no duplicate,
    each frame at a real offset, ending at the stream's last one."""
    offsets, covered = await stream_contents(redis, session_id)
    assert coverage(frames) == covered
    assert all(frame["offset"] in offsets for frame in frames)
    assert frames[-1]["offset"] == offsets[-1]


# --- Additions for the SSE, multi-session, slow-subscriber and client tests.


def start_frontends(
    base: RunningStack, extra_env: dict[str, str], *, api: bool = True, relay_port: int = 0
) -> RunningStack:
    """A relay (and, with `api`, an API) with settings of their own, beside `base` and against its Redis.
    Generations accepted by either API are run by `base`'s workers. Stop it with `stop()`."""
    front = RunningStack(redis_url=base.redis_url, extra_env=extra_env, simulator_url=base.simulator_url)
    try:
        front.relay_url = front.spawn("relay", ["--port", str(relay_port)], name="relay").wait_ready()
        if api:
            front.api_url = front.spawn("api", ["--port", "0"], name="api").wait_ready()
    except BaseException:
        print(front.log_tail())
        front.stop()
        raise
    return front


def http_url(ws_url: str) -> str:
    """The plain-HTTP base of a relay (for /healthz and /stats)."""
    return "http://" + ws_url.removeprefix("ws://")


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
        transcript = Transcript()
        for frame in self.frames:
            transcript.apply(frame)
        return transcript


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


def transcript_of(frames: list[dict[str, Any]]) -> Transcript:
    transcript = Transcript()
    for frame in frames:
        transcript.apply(frame)
    return transcript


async def wait_for_condition(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll `check` until it holds; a timeout is a test failure. The interval only paces the polling."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(interval)


class Closable(Protocol):
    async def close(self) -> None: ...


ClosableT = TypeVar("ClosableT", bound=Closable)


class Closer:
    """Closes what a test opened, whether it passed or failed: a leaked socket would otherwise surface as a
    ResourceWarning (an error here) in whichever test happens to run the garbage collector."""

    def __init__(self) -> None:
        self._items: list[Closable] = []

    def __call__(self, item: ClosableT) -> ClosableT:
        self._items.append(item)
        return item

    async def close_all(self) -> None:
        for item in reversed(self._items):
            with contextlib.suppress(Exception):
                await item.close()
        self._items.clear()


# --- Additions for the security and hostile-input tests (tests/test_security.py, tests/test_hostile_input.py).

import ssl  # noqa: E402 - kept with the helpers that use them
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402


def clean_environment() -> dict[str, str]:
    """This process's environment without any tokenfan, upstream or Redis configuration."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TOKENFAN_", "OPENAI_")) and key != "REDIS_URL"
    }


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


#: A simulator that, unlike the CLI's, demands an upstream key: its own environment's OPENAI_API_KEY.
_KEYED_SIMULATOR = """\
import asyncio, os, sys
from tokenfan.cli.simulator import SimulatorConfig, serve
config = SimulatorConfig(tokens_per_second=0, reply_tokens=48, api_key=os.environ["OPENAI_API_KEY"])
asyncio.run(serve(config, host="127.0.0.1", port=0, ready_file=sys.argv[1]))
"""


class KeyedSimulator(ChildProcess):
    """The simulator (same replies as `SIMULATOR`) answering 401 unless sent ``Bearer $OPENAI_API_KEY``."""

    def start(self) -> KeyedSimulator:
        self.ready_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _KEYED_SIMULATOR, str(self.ready_file)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        return self


def start_stack(stack: RunningStack, *, keyed_simulator: bool = False, workers: int = 1) -> RunningStack:
    """Like `stack.start()`; with `keyed_simulator`, the simulator is a `KeyedSimulator` (set OPENAI_API_KEY
    in `extra_env`), and a stack given a `simulator_url` uses that one instead of starting its own. Stops
    what it started and prints the logs when a component fails to start."""
    try:
        if not stack.simulator_url:
            if keyed_simulator:
                with (stack.logs / "simulator.log").open("ab") as log:  # the child keeps its own descriptor
                    simulator = KeyedSimulator(
                        "simulator", env=stack.env, stderr=log, name="simulator"
                    ).start()
                stack.children.append(simulator)
                stack.simulator_url = simulator.wait_ready()
            else:
                stack.simulator_url = stack.spawn(
                    "simulator", ["--port", "0", "--tokens-per-second", "0", "--reply-tokens", "48"]
                ).wait_ready()
        stack.relay_url = stack.spawn("relay", ["--port", "0"], name="relay").wait_ready()
        stack.api_url = stack.spawn("api", ["--port", "0"], name="api").wait_ready()
        for _ in range(workers):
            stack.spawn("worker").wait_ready()
    except BaseException:
        print(stack.log_tail())
        stack.stop()
        raise
    return stack


def relay_process(stack: RunningStack) -> ChildProcess:
    (relay,) = [child for child in stack.children if child.role == "relay" and child.alive()]
    return relay


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


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


async def closed_with(url: str, *, timeout: float = 10.0, **connect_options: Any) -> tuple[int, str]:
    """Like `close_reason`, with connect options (headers, origin): the (code, reason) the relay closes with."""
    async with asyncio.timeout(timeout), connect(url, **connect_options) as websocket:
        try:
            frame = await websocket.recv()
        except ConnectionClosed as closed:
            received = closed.rcvd
        else:
            raise AssertionError(f"the relay sent a frame instead of closing: {frame!r}")
    assert received is not None, "the connection ended without a close frame"
    return received.code, received.reason


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


class TlsProxy:
    """A TLS terminator in front of a plain TCP server (Redis has no TLS in the embedded build): clients
    speak TLS to `port`, and the bytes flow both ways to the target. It runs on its own thread and event
    loop, so it outlives the per-test loops; `stop()` closes every connection it holds."""

    def __init__(self, target_host: str, target_port: int, context: ssl.SSLContext) -> None:
        self.target = (target_host, target_port)
        self.context = context
        self.port = 0
        self.accepted = 0  # connections that completed the TLS handshake
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    def start(self) -> TlsProxy:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the TLS proxy did not start")
        if self._error is not None:
            raise RuntimeError("the TLS proxy failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); a thread must not raise into pytest
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self._forward(reader, writer)
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=self.context)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for transport in list(self._transports):  # each handler then ends by itself
                transport.abort()
            await asyncio.gather(*handlers, return_exceptions=True)
            await server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writers = [writer]
        self._transports.add(writer.transport)
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
            writers.append(target_writer)
            self._transports.add(target_writer.transport)
            await asyncio.gather(_pump(reader, target_writer), _pump(target_reader, writer))
        except OSError:
            pass
        finally:
            for each in writers:
                each.close()
                try:
                    async with asyncio.timeout(2):
                        await each.wait_closed()
                except (TimeoutError, OSError):
                    each.transport.abort()
                self._transports.discard(each.transport)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:  # ssl.SSLError and ConnectionError included: the other side went away
        pass
    finally:
        sink.close()
