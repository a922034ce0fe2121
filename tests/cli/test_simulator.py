"""The simulator, over a real socket, through the real openai client: the path every other test relies on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tokenfan.cli.simulator import SimulatorConfig, create_app, parse_directive, reply_chunks

MODEL = "tokenfan-sim"
FAST = SimulatorConfig(tokens_per_second=0)
# Loading the CA bundle costs ~50 ms per HTTP client; the simulator speaks plain HTTP, so share one context.
TLS = ssl.create_default_context()


class _Server(uvicorn.Server):
    """uvicorn that reports readiness on an event instead of in a log line."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@contextlib.contextmanager
def serving(config: SimulatorConfig) -> Iterator[str]:
    """A simulator on a free port, on its own thread and event loop; yields its URL once it accepts.

    Its own loop lets one server outlive the per-test loops (a uvicorn shutdown costs 0.2 s, which per
    test would dominate), and keeps its timing honest: a test's loop never runs the server's code.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        # A bounded graceful shutdown: a test that fails mid-stall must not hang the session.
        uvicorn_config = uvicorn.Config(
            create_app(config), lifespan="off", log_config=None, timeout_graceful_shutdown=1
        )
        server = _Server(uvicorn_config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="simulator")
        thread.start()
        try:
            while not server.ready.wait(timeout=0.1):
                assert thread.is_alive(), "the simulator died during start-up"
            yield "http://{}:{}".format(*sock.getsockname())
        finally:
            server.should_exit = True
            thread.join()


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with serving(FAST) as url:
        yield url


@dataclass
class Sim:
    url: str
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient  # for what the openai client cannot show: raw bytes, counters, bad bodies

    async def stats(self) -> dict[str, int]:
        result: dict[str, int] = (await self.http.get("/_sim/stats")).json()
        return result

    async def wait_for_stats(
        self, done: Callable[[dict[str, int]], bool], within: float = 1.5
    ) -> dict[str, int]:
        """Poll the counters until `done` holds; each poll is an HTTP round trip, so no sleep is needed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not done(stats := await self.stats()):
            assert loop.time() < deadline, f"simulator counters never got there: {stats}"
        return stats


def openai_client(url: str, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    http_client = openai.DefaultAsyncHttpx2Client(verify=TLS)
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, http_client=http_client)


@pytest.fixture
async def sim(sim_url: str) -> AsyncIterator[Sim]:
    """The module's shared simulator (tests reading its counters compare against a baseline)."""
    async with openai_client(sim_url) as client, httpx.AsyncClient(base_url=sim_url, verify=TLS) as http:
        yield Sim(sim_url, client, http)


def chat(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": text}]


def expected(messages: list[ChatCompletionMessageParam], config: SimulatorConfig = FAST, **extra: Any) -> str:
    return "".join(reply_chunks({"model": MODEL, "messages": messages, **extra}, config))


async def stream_all(
    client: openai.AsyncOpenAI,
    messages: list[ChatCompletionMessageParam],
    *,
    include_usage: bool = True,
    received: list[ChatCompletionChunk] | None = None,
    model: str = MODEL,
) -> list[ChatCompletionChunk]:
    """Every chunk of one streamed completion; `received` keeps what arrived even if the stream fails."""
    chunks = [] if received is None else received
    stream = await client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": include_usage}
    )
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


def content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def content_pieces(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


# ---------------------------------------------------------------- the happy path


async def test_default_stream_is_the_predicted_reply_with_usage(sim: Sim) -> None:
    before = await sim.stats()
    messages = chat("Tell me about rivers.")
    predicted = reply_chunks({"model": MODEL, "messages": messages}, FAST)
    assert len(predicted) == FAST.reply_tokens

    chunks = await stream_all(sim.client, messages)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert content_pieces(chunks) == predicted
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.completion_tokens == FAST.reply_tokens
    assert usage.usage.prompt_tokens == 7  # "You answer briefly." + "Tell me about rivers."
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    stats = await sim.wait_for_stats(lambda s: s["streams_completed"] == before["streams_completed"] + 1)
    assert (stats["streams_started"], stats["streams_open"]) == (before["streams_started"] + 1, 0)


async def test_wire_format_is_openais(sim: Sim) -> None:
    body = {"model": MODEL, "messages": chat('<<sim {"tokens": 3}>>'), "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with sim.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([part async for part in response.aiter_bytes()]).decode()

    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_non_streaming_completion(sim: Sim) -> None:
    messages = chat("Describe a lake.")
    result = await sim.client.chat.completions.create(model=MODEL, messages=messages)
    assert result.object == "chat.completion"
    assert result.choices[0].message.content == expected(messages)
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.completion_tokens == FAST.reply_tokens


async def test_replies_are_deterministic(sim: Sim) -> None:
    first = content(await stream_all(sim.client, chat("same question")))
    again = content(await stream_all(sim.client, chat("same question")))
    other = content(await stream_all(sim.client, chat("another question")))
    assert first == again == expected(chat("same question"))
    assert other != first

    pieces = reply_chunks({"model": MODEL, "messages": chat("same question")}, FAST)
    assert not pieces[0].startswith(" ")
    assert all(piece.startswith(" ") for piece in pieces[1:])
    assert pieces[-1].endswith(".")
    assert reply_chunks({"model": "other-model", "messages": chat("same question")}, FAST) != pieces


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
async def test_token_cap_cuts_the_reply_with_finish_reason_length(sim: Sim, cap_field: str) -> None:
    messages = chat("A long story, please.")
    cap: dict[str, Any] = {cap_field: 5}
    stream = await sim.client.chat.completions.create(model=MODEL, messages=messages, stream=True, **cap)
    async with stream:
        chunks = [chunk async for chunk in stream]
    assert content_pieces(chunks) == reply_chunks({"model": MODEL, "messages": messages, **cap}, FAST)
    assert len(content_pieces(chunks)) == 5
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_directive_sets_length_and_is_honoured_by_reply_chunks(sim: Sim) -> None:
    messages = chat('Short one. <<sim {"tokens": 4}>>')
    chunks = await stream_all(sim.client, messages)
    assert len(content_pieces(chunks)) == 4
    assert content(chunks) == expected(messages)


async def test_rate_paces_tokens(sim: Sim) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks = await stream_all(sim.client, chat('<<sim {"tokens": 9, "rate": 40}>>'))
    elapsed = loop.time() - started
    assert len(content_pieces(chunks)) == 9
    assert elapsed >= 8 / 40  # the 9th token is due 8 intervals after the first


# ---------------------------------------------------------------- reply shapes


async def test_reasoning_streams_before_content(sim: Sim) -> None:
    reasoning = ["Let me", " think", " about it."]
    messages = chat(f"<<sim {json.dumps({'reasoning': reasoning, 'tokens': 3})}>>")
    chunks = await stream_all(sim.client, messages)

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thoughts = [getattr(d, "reasoning_content", None) for d in deltas]
    assert [t for t in thoughts if t] == reasoning
    last_thought = max(i for i, t in enumerate(thoughts) if t)
    first_content = min(i for i, d in enumerate(deltas) if d.content)
    assert last_thought < first_content
    assert content(chunks) == expected(messages)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("parallel", [False, True])
async def test_tool_calls_reassemble_by_index(sim: Sim, parallel: bool) -> None:
    calls = [
        {
            "name": "get_weather",
            "arguments": json.dumps({"city": "Paris", "unit": "celsius"}),
            "id": "call_w",
        },
        {"name": "get_time", "arguments": json.dumps({"timezone": "Europe/Paris", "format": "24h"})},
    ]
    directive = {"tool_calls": calls, "parallel": parallel, "tokens": 0, "tool_chunk": 5}
    chunks = await stream_all(sim.client, chat(f"<<sim {json.dumps(directive)}>>"))

    names: dict[int, str] = {}
    ids: dict[int, str] = {}
    arguments: dict[int, str] = {}
    order: list[int] = []
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            order.append(call.index)
            if call.id:
                ids[call.index] = call.id
            if call.function and call.function.name:
                names[call.index] = call.function.name
            if call.function and call.function.arguments:
                arguments[call.index] = arguments.get(call.index, "") + call.function.arguments

    assert names == {0: "get_weather", 1: "get_time"}
    assert arguments == {0: calls[0]["arguments"], 1: calls[1]["arguments"]}
    assert ids[0] == "call_w"
    assert ids[1].startswith("call_")
    assert (order != sorted(order)) is parallel  # interleaved only when parallel
    assert chunks[-2].choices[0].finish_reason == "tool_calls"


async def test_non_streaming_tool_calls(sim: Sim) -> None:
    directive = {"tool_calls": [{"name": "lookup", "arguments": '{"q": "x"}'}], "tokens": 0}
    result = await sim.client.chat.completions.create(
        model=MODEL, messages=chat(f"<<sim {json.dumps(directive)}>>")
    )
    message = result.choices[0].message
    assert result.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("lookup", '{"q": "x"}')


async def test_unicode_chunks_reassemble_byte_exact(sim: Sim) -> None:
    # A ZWJ family emoji split mid-grapheme, CJK, a combining accent on its own piece, a flag split in two.
    pieces = ["👨\u200d", "👩\u200d👧", "\u200d👦", " 你好", "，世界", " cafe", "\u0301", " 🇫", "🇷", "!"]
    messages = chat(f"<<sim {json.dumps({'chunks': pieces})}>>")
    assert reply_chunks({"model": MODEL, "messages": messages}, FAST) == pieces

    chunks = await stream_all(sim.client, messages)
    assert content_pieces(chunks) == pieces
    assert content(chunks).encode() == "".join(pieces).encode()


async def raw_chunks(sim: Sim, directive: dict[str, Any]) -> tuple[bytes, list[dict[str, Any]]]:
    """One streamed reply's body as sent, and its chunks as decoded JSON."""
    body = {"model": MODEL, "messages": chat(f"<<sim {json.dumps(directive)}>>"), "stream": True}
    async with sim.http.stream("POST", "/v1/chat/completions", json=body) as response:
        raw = b"".join([part async for part in response.aiter_bytes()])
    events = raw.decode().split("\n\n")
    return raw, [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


async def test_cumulative_chunks_carry_everything_so_far(sim: Sim) -> None:
    directive = {"chunks": ["Hel", "lo", " world"], "reasoning": ["I ", "see"], "cumulative": True}
    _, chunks = await raw_chunks(sim, directive)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert [d["reasoning_content"] for d in deltas if d.get("reasoning_content")] == ["I ", "I see"]
    contents = [d["content"] for d in deltas if d.get("content")]
    assert contents == ["Hel", "Hello", "Hello world", "Hello world"]  # the finish chunk repeats it all
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_tool_calls_without_index_name_each_call_by_its_first_delta(sim: Sim) -> None:
    calls = [{"name": "a", "arguments": '{"x": 1}', "id": "call_a"}, {"name": "b", "arguments": "{}"}]
    _, chunks = await raw_chunks(sim, {"tool_calls": calls, "tool_index": False, "tokens": 0})
    deltas = [
        call
        for chunk in chunks
        if chunk["choices"]
        for call in chunk["choices"][0]["delta"].get("tool_calls", [])
    ]
    assert deltas
    assert all("index" not in delta for delta in deltas)
    assert next(delta["id"] for delta in deltas if "id" in delta) == "call_a"


async def test_lone_surrogates_go_out_as_json_escapes(sim: Sim) -> None:
    pieces = ["smile ", "\ud83d", "\ude00", " lone \udc00"]  # an emoji's halves, then an unpaired one
    raw, _ = await raw_chunks(sim, {"chunks": pieces})
    assert b'"\\ud83d"' in raw
    assert b'" lone \\udc00"' in raw
    chunks = await stream_all(sim.client, chat(f"<<sim {json.dumps({'chunks': pieces})}>>"))
    assert content_pieces(chunks) == pieces  # valid JSON: the openai client decodes it as sent


async def test_empty_deltas_and_extra_fields_do_not_change_the_text(sim: Sim) -> None:
    messages = chat('<<sim {"tokens": 6, "empty_deltas": true, "extra_fields": true}>>')
    chunks = await stream_all(sim.client, messages)
    assert content(chunks) == expected(messages)
    assert any(c.choices and c.choices[0].delta.content == "" and not c.choices[0].delta.role for c in chunks)
    assert any(
        c.choices and c.choices[0].delta.content is None and not c.choices[0].finish_reason for c in chunks
    )
    assert all((c.model_extra or {}).get("x_provider") for c in chunks)
    assert chunks[0].system_fingerprint == "fp_tokenfan_sim"


async def test_usage_none_and_every(sim: Sim) -> None:
    never = await stream_all(sim.client, chat('<<sim {"tokens": 3, "usage": "none"}>>'))
    assert all(c.usage is None for c in never)
    assert never[-1].choices[0].finish_reason == "stop"

    every = await stream_all(sim.client, chat('<<sim {"tokens": 3, "usage": "every"}>>'), include_usage=False)
    counts = [c.usage.completion_tokens for c in every if c.usage is not None]
    assert len(counts) == len(every)
    assert counts == sorted(counts)
    assert (counts[0], counts[-1]) == (0, 3)


async def test_no_usage_unless_asked(sim: Sim) -> None:
    chunks = await stream_all(sim.client, chat('<<sim {"tokens": 2}>>'), include_usage=False)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_finish_reason_override(sim: Sim) -> None:
    chunks = await stream_all(sim.client, chat('<<sim {"tokens": 2, "finish_reason": "content_filter"}>>'))
    assert chunks[-2].choices[0].finish_reason == "content_filter"


# ---------------------------------------------------------------- faults


async def test_status_fails_the_first_n_then_succeeds(sim: Sim) -> None:
    messages = chat('<<sim {"status": 429, "times": 1, "retry_after": 2, "key": "rl-1", "tokens": 3}>>')
    with pytest.raises(openai.RateLimitError) as failure:
        await stream_all(sim.client, messages)
    assert failure.value.response.headers["retry-after"] == "2"
    assert isinstance(failure.value.body, dict)
    assert failure.value.body["type"] == "requests"

    assert content(await stream_all(sim.client, messages)) == expected(messages)


async def test_status_without_times_always_fails(sim: Sim) -> None:
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await sim.client.chat.completions.create(model=MODEL, messages=chat('<<sim {"status": 503}>>'))


async def test_drop_after_cuts_the_connection_mid_body(sim: Sim) -> None:
    before = await sim.stats()
    messages = chat('<<sim {"drop_after": 3}>>')
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError) as failure:
        await stream_all(sim.client, messages, received=received)
    # openai wraps the transport's complaint about the unterminated chunked body.
    assert type(failure.value.__cause__).__name__ == "RemoteProtocolError"  # httpx2's
    assert "incomplete chunked read" in str(failure.value.__cause__)
    assert content_pieces(received) == reply_chunks({"model": MODEL, "messages": messages}, FAST)[:3]
    assert all(not c.choices or c.choices[0].finish_reason is None for c in received)
    await sim.wait_for_stats(lambda s: s["streams_aborted"] == before["streams_aborted"] + 1)


async def test_error_after_raises_api_error(sim: Sim) -> None:
    messages = chat('<<sim {"error_after": 2}>>')
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as failure:
        await stream_all(sim.client, messages, received=received)
    assert type(failure.value) is openai.APIError  # neither a status nor a connection error
    assert failure.value.message == "simulated mid-stream error"
    assert content_pieces(received) == reply_chunks({"model": MODEL, "messages": messages}, FAST)[:2]


async def test_faults_with_times_clear_for_the_retry(sim: Sim) -> None:
    messages = chat('<<sim {"drop_after": 1, "times": 1, "tokens": 4}>>')
    with pytest.raises(openai.APIConnectionError):
        await stream_all(sim.client, messages)
    assert content(await stream_all(sim.client, messages)) == expected(messages)


@pytest.mark.parametrize(
    "directive",
    [
        pytest.param({"stall_after": 2}, id="stalled"),
        pytest.param({"rate": 0.5}, id="between-slow-tokens"),
    ],
)
async def test_client_leaving_is_counted_promptly(sim: Sim, directive: dict[str, Any]) -> None:
    before = await sim.stats()
    stream = await sim.client.chat.completions.create(
        model=MODEL, messages=chat(f"<<sim {json.dumps(directive)}>>"), stream=True
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first token is in: the simulator is now stalled or sleeping
        assert (await sim.stats())["streams_open"] == 1
    gone = before["streams_disconnected"] + 1
    stats = await sim.wait_for_stats(lambda s: s["streams_disconnected"] == gone, within=1.0)
    assert (stats["streams_open"], stats["streams_completed"]) == (0, before["streams_completed"])


# ---------------------------------------------------------------- refusals


async def test_wrong_api_key_is_a_401() -> None:
    config = SimulatorConfig(tokens_per_second=0, api_key="sk-right")
    with serving(config) as url:
        async with openai_client(url, api_key="sk-wrong") as wrong, openai_client(url, "sk-right") as right:
            with pytest.raises(openai.AuthenticationError) as failure:
                await stream_all(wrong, chat("hello"))
            assert isinstance(failure.value.body, dict)
            assert failure.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            assert content(await stream_all(right, chat("hello"))) == expected(chat("hello"), config)


async def test_a_simulator_told_its_models_refuses_any_other_as_openai_does() -> None:
    config = SimulatorConfig(tokens_per_second=0, models=(MODEL, "other-sim"))
    with serving(config) as url:
        async with openai_client(url) as client:
            with pytest.raises(openai.NotFoundError) as failure:
                await stream_all(client, chat("hello"), model="gpt-nonexistent")
            assert isinstance(failure.value.body, dict)
            assert failure.value.body["code"] == "model_not_found"
            assert "gpt-nonexistent" in failure.value.body["message"]
            assert [m.id for m in (await client.models.list()).data] == [MODEL, "other-sim"]
            assert content(await stream_all(client, chat("hello"))) == expected(chat("hello"), config)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param({"messages": [{"role": "user", "content": "x"}]}, id="no-model"),
        pytest.param({"model": MODEL, "messages": []}, id="no-messages"),
        pytest.param({"model": MODEL, "messages": [{"content": "x"}]}, id="message-without-role"),
        pytest.param({"model": MODEL, "messages": ["x"]}, id="message-not-object"),
        pytest.param({"model": MODEL, "messages": chat("x"), "max_tokens": 0}, id="bad-max-tokens"),
        pytest.param({"model": MODEL, "messages": chat('<<sim {"bogus": 1}>>')}, id="unknown-option"),
        pytest.param({"model": MODEL, "messages": chat("<<sim {nope}>>")}, id="directive-not-json"),
        pytest.param({"model": MODEL, "messages": chat('<<sim {"tokens": "5"}>>')}, id="option-wrong-type"),
        pytest.param({"model": MODEL, "messages": chat('<<sim {"status": 200}>>')}, id="status-not-an-error"),
        pytest.param(
            {"model": MODEL, "messages": chat('<<sim {"tool_index": false, "parallel": true}>>')},
            id="parallel-calls-without-index",
        ),
    ],
)
async def test_bad_requests_are_400_in_openai_format(sim: Sim, body: bytes | dict[str, Any]) -> None:
    if isinstance(body, bytes):
        response = await sim.http.post("/v1/chat/completions", content=body)
    else:
        response = await sim.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (None, None)
    assert error["message"]


async def test_unknown_option_is_a_bad_request_error_for_openai(sim: Sim) -> None:
    with pytest.raises(openai.BadRequestError, match="bogus"):
        await stream_all(sim.client, chat('<<sim {"bogus": true}>>'))


async def test_serve_announces_readiness_and_stops_on_sigterm(tmp_path: Path) -> None:
    ready_file = tmp_path / "sim.json"
    code = (
        "import asyncio; from tokenfan.cli.simulator import SimulatorConfig, serve; "
        f"asyncio.run(serve(SimulatorConfig(), host='127.0.0.1', port=0, ready_file={str(ready_file)!r}))"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stderr=asyncio.subprocess.PIPE)
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while not ready_file.exists():
            assert asyncio.get_running_loop().time() < deadline, "the simulator never became ready"
            with contextlib.suppress(TimeoutError):  # a timed wait on the process also catches its death
                await asyncio.wait_for(process.wait(), timeout=0.05)
                pytest.fail(f"the simulator exited early: {(await process.communicate())[1].decode()}")
        url = json.loads(ready_file.read_text())["url"]
        async with httpx.AsyncClient(base_url=url, verify=TLS) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 0, stderr.decode()


async def test_models_and_health(sim: Sim) -> None:
    models = await sim.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await sim.http.get("/healthz")).json() == {"status": "ok"}


# ---------------------------------------------------------------- the pure parts


def test_parse_directive_reads_the_last_user_message_only() -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": '<<sim {"tokens": 1}>>'},
            {"role": "assistant", "content": '<<sim {"tokens": 2}>>'},
            {
                "role": "user",
                "content": [{"type": "text", "text": 'see <<sim {"chunks": ["a>>", "b"]} >> ok'}],
            },
        ],
    }
    directive = parse_directive(body)
    assert directive.chunks == ("a>>", "b")
    assert directive.tokens is None
    assert directive.text == '<<sim {"chunks": ["a>>", "b"]} >>'
    assert reply_chunks(body, FAST) == ["a>>", "b"]


def test_reply_chunks_is_pure_and_capped() -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": chat('<<sim {"tokens": 10, "reasoning": ["r1", "r2"]}>>'),
    }
    assert reply_chunks(body, FAST) == reply_chunks(body, FAST)
    assert len(reply_chunks(body, FAST)) == 10
    assert len(reply_chunks({**body, "max_tokens": 5}, FAST)) == 3  # reasoning spends the budget first
    assert reply_chunks({"model": MODEL, "messages": chat("x")}, SimulatorConfig(reply_tokens=0)) == []


@pytest.mark.parametrize(
    "bad", ['<<sim {"tokens": -1}>>', '<<sim ["list"]>>', '<<sim {"tokens": 1} oops', "<<sim"]
)
def test_malformed_directives_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="sim"):
        parse_directive({"model": MODEL, "messages": chat(bad)})
