"""The browser side in a real browser: the page at ``/`` and the client module it loads, in headless Chromium,
against real processes on a stack secured as in production (API keys, session tokens, an origin allowlist)
with tokens that live four seconds, so that refreshing them is part of every test.

Each pane's frames are read back from the page and checked twice: by the Python `Transcript` (gap,
duplicate, length and SHA-256) and against the session's Redis stream (every event once, in order). The
page's console must stay free of errors; screenshots go to the test output folder (tests/support/browser.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext
from redis.asyncio import Redis

from tests.support.browser import DemoPage, PageConsole, chromium, until
from tests.support.delivery import assert_exact_delivery, transcript_of
from tests.support.requests import bearer, new_session_id
from tests.support.stack import RunningStack, free_port, relay_process
from tests.support.watchers import Watcher
from tests.support.watchers import finished as watcher_finished
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.events import GenerationStatus

__all__: list[str] = []

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

KEY = "tfk_browser-tests-0123456789abcdef"
SECRET = "browser-tests-token-secret-0123456789abcdef"
TTL = 4


@pytest.fixture(scope="module")
def site(redis_server: EmbeddedRedis) -> Iterator[RunningStack]:
    """API, relay and a worker, secured; the page's origin (the API's) is the one allowed origin."""
    api_port, relay_port = free_port(), free_port()
    stack = RunningStack(
        redis_url=redis_server.url,
        extra_env={
            "TOKENFAN_INSECURE_DEV_MODE": "false",
            "TOKENFAN_API_KEYS": f"browser:{KEY}",
            "TOKENFAN_TOKEN_SECRETS": SECRET,
            "TOKENFAN_TOKEN_TTL_SECONDS": str(TTL),
            "TOKENFAN_ALLOWED_ORIGINS": f"http://127.0.0.1:{api_port}",
            "TOKENFAN_PUBLIC_RELAY_URL": f"ws://127.0.0.1:{relay_port}",
        },
    )
    try:
        yield stack.start(api_port=api_port, relay_port=relay_port)
    except BaseException:
        print(stack.log_tail())
        raise
    finally:
        stack.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[BrowserContext]:
    async with chromium() as context:
        yield context


@pytest_asyncio.fixture(loop_scope="module")
async def demo(browser: BrowserContext, site: RunningStack) -> AsyncIterator[DemoPage]:
    console = PageConsole()
    page = console.watch(await browser.new_page())
    try:
        yield DemoPage(page, console, site.api_url)
    finally:
        await page.close()


@pytest_asyncio.fixture(loop_scope="module")
async def service(site: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=site.api_url, headers=bearer(KEY), timeout=10) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def prompt(text: str, **directive: Any) -> str:
    """A prompt with a directive for the simulator (pace, reasoning, tool calls), typed as a person would."""
    return f"{text} <<sim {json.dumps(directive)}>>"


async def assert_every_pane_exact(
    demo: DemoPage, service: httpx.AsyncClient, redis: Redis, session_id: str, generation_id: str
) -> list[dict[str, Any]]:
    """Every pane holds the session's stream exactly, and shows the text `GET /v1/generations/{id}` has."""
    view = (await service.get(f"/v1/generations/{generation_id}")).json()
    assert view["status"] == "completed", view
    panes = await demo.panes()
    for pane in panes:
        assert pane["errors"] == [], pane["number"]
        generation = transcript_of(pane["frames"]).generations[generation_id]
        assert generation.status is GenerationStatus.COMPLETED
        assert generation.text == view["text"], pane["number"]
        await assert_exact_delivery(redis, session_id, pane["frames"])
        selector = f'[data-pane="{pane["number"]}"] .generation[data-id="{generation_id}"] .answer'
        assert await demo.page.text_content(selector) == view["text"]
    return panes


async def test_the_client_is_served_without_credentials_with_types_caching_and_cors(
    site: RunningStack,
) -> None:
    origin = site.env["TOKENFAN_ALLOWED_ORIGINS"]
    async with httpx.AsyncClient(base_url=site.api_url) as anonymous:
        module = await anonymous.get("/v1/client/tokenfan.js", headers={"Origin": origin})
        assert module.status_code == 200
        assert module.headers["content-type"] == "text/javascript; charset=utf-8"
        assert module.headers["cache-control"] == "public, max-age=300"
        assert module.headers["access-control-allow-origin"] == origin
        assert "export class SessionStream" in module.text
        again = await anonymous.get(
            "/v1/client/tokenfan.js", headers={"If-None-Match": module.headers["etag"]}
        )
        assert (again.status_code, again.content) == (304, b"")
        other = await anonymous.get("/v1/client/tokenfan.js", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        types = await anonymous.get("/v1/client/tokenfan.d.ts")
        assert types.headers["content-type"].startswith("application/typescript")
        assert "export declare class SessionStream" in types.text
        config = (await anonymous.get("/v1/client/config.json")).json()
        assert config == {"protocol": 1, "relay": site.env["TOKENFAN_PUBLIC_RELAY_URL"]}
        page = await anonymous.get("/")
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert KEY not in page.text
        # Everything with data still needs a credential.
        assert (await anonymous.get(f"/v1/sessions/{new_session_id()}")).status_code == 401


async def test_panes_on_one_session_show_the_api_text_reasoning_tool_calls_and_the_verified_badge(
    demo: DemoPage, service: httpx.AsyncClient, redis: Redis
) -> None:
    session_id = new_session_id()
    await demo.open(session_id, KEY)
    reasoning = ["First, ", "what fan-out means. ", "Then an example."]
    call = {"name": "search", "arguments": '{"query": "fan-out"}'}
    generation_id = await demo.send(
        prompt("Tell me about fan-out.", tokens=60, rate=150, reasoning=reasoning, tool_calls=[call])
    )
    await demo.wait_verified(generation_id, panes=3)
    panes = await assert_every_pane_exact(demo, service, redis, session_id, generation_id)
    assert [pane["transport"] for pane in panes] == ["WebSocket", "WebSocket", "SSE"]
    view = (await service.get(f"/v1/generations/{generation_id}")).json()
    assert view["reasoning"] == "".join(reasoning)
    shown = await demo.page.locator(".reasoning-text").all_text_contents()
    assert shown == [view["reasoning"]] * 3  # apart from the answer, in each pane
    tools = await demo.page.locator(".tools li").all_text_contents()
    assert tools == ['Tool call: search({"query": "fan-out"})'] * 3
    assert await demo.page.text_content(f'#queue li[data-id="{generation_id}"] .status') == "completed"
    await demo.screenshot("panes-verified")
    await demo.page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than it
    assert await demo.page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")
    await demo.screenshot("phone")
    assert demo.console.errors() == []


async def test_a_dropped_pane_and_a_relay_killed_mid_generation_end_with_the_exact_text(
    demo: DemoPage, site: RunningStack, service: httpx.AsyncClient, redis: Redis
) -> None:
    session_id = new_session_id()
    await demo.open(session_id, KEY)
    generation_id = await demo.send(prompt("Survive this.", tokens=360, rate=60))
    await demo.wait_for_deltas(1, generation_id, 5)
    await demo.page.click('[data-pane="1"] .drop')
    await until(demo.page, "() => demo.panes[0].stream.connections === 2")
    await demo.wait_for_deltas(1, generation_id, 15)

    relay = relay_process(site)
    port = site.relay_url.rsplit(":", 1)[1]
    relay.kill()  # SIGKILL, mid-generation: no close frame reaches anyone
    assert not any(f["type"] == "generation.completed" for f in (await demo.panes())[0]["frames"])
    site.spawn("relay", ["--port", port], name="relay-restarted").wait_ready()

    await demo.wait_verified(generation_id, panes=3)
    panes = await assert_every_pane_exact(demo, service, redis, session_id, generation_id)
    assert panes[0]["connections"] >= 3  # opened, dropped on purpose, and cut by the crash
    assert panes[1]["connections"] >= 2  # cut by the crash (the SSE pane does not use the relay)
    await demo.screenshot("resumed-after-drop-and-relay-crash")
    # The browser reports the connections refused while the relay was down; nothing else is an error.
    assert (
        demo.console.errors(expected=rf"WebSocket connection to 'ws://127\.0\.0\.1:{port}/.*' failed") == []
    )


async def test_a_pane_that_joins_late_gets_the_history_then_the_live_tail(
    demo: DemoPage, service: httpx.AsyncClient, redis: Redis
) -> None:
    session_id = new_session_id()
    await demo.open(session_id, KEY)
    generation_id = await demo.send(prompt("Join me late.", tokens=240, rate=60))
    await demo.wait_for_deltas(1, generation_id, 10)
    await demo.page.focus("#join-late")  # by keyboard, as anyone may
    await demo.page.keyboard.press("Enter")
    await demo.page.keyboard.press("Tab")
    await demo.page.keyboard.press("Space")  # the "over SSE" box
    await demo.page.focus("#join-late")
    await demo.page.keyboard.press("Enter")
    first = (await demo.panes())[0]["frames"]
    assert not any(f["type"] == "generation.completed" for f in first)  # they joined mid-generation

    await demo.wait_verified(generation_id, panes=5)
    panes = await assert_every_pane_exact(demo, service, redis, session_id, generation_id)
    for late in panes[3:]:
        assert late["frames"][0]["type"] == "generation.started"  # the history first…
        assert late["frames"][-1]["type"] == "generation.completed"  # …then the live tail to the end
    assert [pane["transport"] for pane in panes[3:]] == ["WebSocket", "SSE"]
    await demo.screenshot("joined-late")
    assert demo.console.errors() == []


async def test_a_token_that_expires_mid_stream_is_refreshed_by_the_function(
    demo: DemoPage, service: httpx.AsyncClient, redis: Redis
) -> None:
    session_id = new_session_id()
    await demo.open(session_id, KEY)
    generation_id = await demo.send(
        prompt("Outlive your token.", tokens=150, rate=30)
    )  # 5 s: past a lifetime
    await demo.wait_verified(generation_id, panes=3)
    panes = await assert_every_pane_exact(demo, service, redis, session_id, generation_id)
    for pane in panes[:2]:  # WebSocket: fresh tokens over the open connection, never a reconnect
        assert pane["refreshes"] >= 1, pane["number"]
        assert pane["connections"] == 1, pane["number"]
    # SSE cannot send a token: at expiry it reopens with a fresh one, after its last offset.
    assert panes[2]["connections"] >= 2
    assert demo.console.errors() == []


async def test_the_client_rebuilds_from_a_snapshot_after_4410_and_stops_on_4403(
    demo: DemoPage, site: RunningStack, service: httpx.AsyncClient
) -> None:
    session_id, other = new_session_id(), new_session_id()
    await demo.open(session_id)
    watcher = await Watcher(site.relay_url, session_id).connect(credential=KEY)
    finished = await service.post(
        f"/v1/sessions/{session_id}/generations",
        json={"model": "tokenfan-sim", "messages": [{"role": "user", "content": "before"}]},
    )
    await watcher.receive_until(watcher_finished(finished.json()["generation_id"]))
    await watcher.close()
    token = finished.json()["token"]
    other_token = (await service.post(f"/v1/sessions/{other}/tokens")).json()["token"]
    result = await demo.page.evaluate(
        REBUILD_AND_REFUSE,
        {"relay": site.relay_url, "session": session_id, "token": token, "other": other_token, "key": KEY},
    )
    snapshot = result["frames"][0]
    assert (snapshot["type"], snapshot["reason"]) == ("snapshot", "offset_gone")
    assert [g["generation_id"] for g in snapshot["generations"]] == [finished.json()["generation_id"]]
    assert result["frames"][-1]["type"] == "generation.completed"
    assert result["verification"]["ok"] is True
    assert result["refused"] == {"code": 4403, "fatal": True, "state": "closed", "reported": 4403}
    assert result["keyInUrl"] == 4401
    assert demo.console.errors() == []


#: In the page: a stream given an offset from another incarnation of the stream (4410) rebuilds from the
#: snapshot and goes on live; one whose token is for another session (4403) stops and reports; an API key
#: is refused before anything is sent.
REBUILD_AND_REFUSE = """async ({relay, session, token, other, key}) => {
  const { SessionStream, Transcript, TokenfanError } = await import("/v1/client/tokenfan.js");
  const api = location.origin;
  const stream = new SessionStream({ relay, api, session, token, after: "zzzzzzzz:1-0" });
  const transcript = new Transcript();
  const frames = [];
  for await (const frame of stream) {
    frames.push(frame);
    transcript.apply(frame);
    if (frame.type === "snapshot" && frame.generations.every(g => g.status === "completed")) {
      await fetch(`/v1/sessions/${session}/generations`, { method: "POST",
        headers: { Authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "tokenfan-sim", messages: [{ role: "user", content: "after" }] }) });
    }
    if (frame.type === "generation.completed") break;
  }
  const last = [...transcript.generations.values()].at(-1);
  const verification = await last.verification;
  const refusedStream = new SessionStream({ relay, session, token: other });
  let reported = null;
  refusedStream.on("error", (error) => { reported = error.code; });
  let refused;
  try { for await (const _ of refusedStream) {} } catch (error) {
    refused = { code: error.code, fatal: error.fatal, state: refusedStream.state, reported };
  }
  let keyInUrl;
  try { for await (const _ of new SessionStream({ relay, session, token: key })) {} } catch (error) {
    keyInUrl = error instanceof TokenfanError ? error.code : String(error);
  }
  return { frames, verification, refused, keyInUrl };
}"""


async def test_one_multi_session_connection_resumes_each_session_and_rebuilds_one_alone(
    demo: DemoPage, site: RunningStack, service: httpx.AsyncClient, redis: Redis
) -> None:
    fresh, rebuilt = new_session_id(), new_session_id()
    watcher = await Watcher(site.relay_url, rebuilt).connect(credential=KEY)
    before = await service.post(
        f"/v1/sessions/{rebuilt}/generations",
        json={"model": "tokenfan-sim", "messages": [{"role": "user", "content": "before"}]},
    )
    await watcher.receive_until(watcher_finished(before.json()["generation_id"]))
    await watcher.close()
    await demo.open(fresh)
    result = await demo.page.evaluate(
        MULTI_SESSION,
        {
            "relay": site.relay_url,
            "sessions": [fresh, rebuilt],
            "key": KEY,
            "prompt": prompt("Both.", tokens=120, rate=60),
        },
    )
    assert result["connections"] >= 2  # dropped on purpose mid-generation, and resumed
    await assert_exact_delivery(redis, fresh, result["frames"][fresh])
    snapshot, *live = result["frames"][rebuilt]
    assert (snapshot["type"], snapshot["reason"]) == ("snapshot", "offset_gone")
    assert [g["generation_id"] for g in snapshot["generations"]] == [before.json()["generation_id"]]
    for session_id, frames in result["frames"].items():
        generation_id = frames[-1]["generation_id"]
        view = (await service.get(f"/v1/generations/{generation_id}")).json()
        assert transcript_of(frames).generations[generation_id].text == view["text"], session_id
    assert live[0]["type"] == "generation.started"  # after the snapshot, only what followed it
    assert demo.console.errors() == []


#: In the page: one `/v1/stream` connection watching two sessions, each with a token function; one starts
#: from a position that is gone (4410, rebuilt from its snapshot alone); the connection is dropped once
#: mid-generation. Generations are enqueued once both subscriptions stand.
MULTI_SESSION = """async ({relay, sessions: [fresh, rebuilt], key, prompt}) => {
  const { MultiStream } = await import("/v1/client/tokenfan.js");
  const headers = { Authorization: `Bearer ${key}`, "content-type": "application/json" };
  const mint = async (session) =>
    (await (await fetch(`/v1/sessions/${session}/tokens`, { method: "POST", headers })).json()).token;
  const enqueue = (session) => fetch(`/v1/sessions/${session}/generations`, { method: "POST", headers,
    body: JSON.stringify({ model: "tokenfan-sim", messages: [{ role: "user", content: prompt }] }) });
  const multi = new MultiStream({ relay, api: location.origin });
  const frames = { [fresh]: [], [rebuilt]: [] };
  const subscribed = new Set();
  let enqueued = false;
  multi.on("subscribed", ({ session }) => {  // again after every reconnect: enqueue once
    subscribed.add(session);
    if (!enqueued && subscribed.size === 2 && frames[rebuilt].length) {
      enqueued = true;
      enqueue(fresh);
      enqueue(rebuilt);
    }
  });
  multi.subscribe(fresh, { token: () => mint(fresh) });
  multi.subscribe(rebuilt, { token: () => mint(rebuilt), after: "zzzzzzzz:1-0" });
  let dropped = false;
  const ended = new Set();
  for await (const frame of multi) {
    frames[frame.session_id].push(frame);
    const deltas = frames[fresh].filter((f) => f.type === "delta").length;
    if (!dropped && deltas >= 5) { dropped = true; multi.reconnect(); }
    if (frame.type === "generation.completed" && frame.generation_id !== frames[rebuilt][0]?.generations?.[0]?.generation_id) ended.add(frame.session_id);
    if (ended.size === 2) break;
  }
  return { frames, connections: multi.connections };
}"""


async def test_a_page_given_only_a_session_token_watches_and_cannot_enqueue(
    demo: DemoPage, site: RunningStack, service: httpx.AsyncClient, redis: Redis
) -> None:
    session_id = new_session_id()
    token = (await service.post(f"/v1/sessions/{session_id}/tokens")).json()["token"]
    await demo.page.goto(f"{site.api_url}/?session={session_id}#token={token}")
    await until(
        demo.page, "() => demo.panes.length === 3 && demo.panes.every(p => p.stream.state === 'open')"
    )
    assert await demo.page.is_hidden("#prompt-form")
    assert await demo.page.is_hidden("#backend-form")  # no key asked for, none held
    accepted = await service.post(
        f"/v1/sessions/{session_id}/generations",
        json={"model": "tokenfan-sim", "messages": [{"role": "user", "content": "for viewers"}]},
    )
    await demo.wait_verified(accepted.json()["generation_id"], panes=3)
    await assert_every_pane_exact(demo, service, redis, session_id, accepted.json()["generation_id"])
    assert demo.console.errors() == []


async def test_a_reader_that_falls_behind_pauses_the_connection_and_resumes_exactly(
    demo: DemoPage, site: RunningStack, redis: Redis
) -> None:
    session_id = new_session_id()
    await demo.open(session_id)
    frames = await demo.page.evaluate(
        SLOW_READER,
        {
            "relay": site.relay_url,
            "session": session_id,
            "key": KEY,
            "prompt": prompt("Slowly.", tokens=80, rate=100),
        },
    )
    assert frames["state"] == "paused"
    assert frames["connections"] >= 2  # paused while unread, resumed after the last offset
    await assert_exact_delivery(redis, session_id, frames["frames"])
    assert demo.console.errors() == []


#: In the page: a `for await` reader that stops reading after the first frame. The stream stops receiving
#: once four frames wait unread (`maxBuffered`), and resumes after its offset when the reader catches up.
SLOW_READER = """async ({relay, session, key, prompt}) => {
  const { SessionStream } = await import("/v1/client/tokenfan.js");
  const headers = { Authorization: `Bearer ${key}`, "content-type": "application/json" };
  const mint = async () =>
    (await (await fetch(`/v1/sessions/${session}/tokens`, { method: "POST", headers })).json()).token;
  const stream = new SessionStream({ relay, session, token: mint, maxBuffered: 4 });
  const opened = new Promise((resolve) => stream.on("open", resolve));
  const paused = new Promise((resolve) => stream.on("close", resolve));
  const reader = stream[Symbol.asyncIterator]();
  await opened;
  fetch(`/v1/sessions/${session}/generations`, { method: "POST", headers,
    body: JSON.stringify({ model: "tokenfan-sim", messages: [{ role: "user", content: prompt }] }) });
  const frames = [(await reader.next()).value];
  await paused;  // nobody reads: the buffer fills, and the stream lets go of its connection
  const state = stream.state;
  for (;;) {
    const { value } = await reader.next();
    frames.push(value);
    if (value.type === "generation.completed") break;
  }
  await reader.return();
  return { frames, connections: stream.connections, state };
}"""


async def test_the_browser_transcript_discards_restarts_replaces_on_snapshots_and_refuses_duplicates(
    demo: DemoPage,
) -> None:
    await demo.open(new_session_id())
    text = "Fan-out 🌍 ünïcode"  # astral and combining-free accents: code points, not UTF-16 units
    digest = hashlib.sha256(text.encode()).hexdigest()
    result = await demo.page.evaluate(TRANSCRIPT_CASES, {"text": text, "length": len(text), "sha256": digest})
    assert result == {
        "restarted": {"content": text, "restarts": 1, "ok": True, "sha256": digest},
        "snapshot": {"content": "from the snapshot", "reasoning": "why", "lastSeq": 7, "fromSnapshot": True},
        "duplicate": "TranscriptError",
        "gap": "TranscriptError",
        "mismatch": False,
    }


#: In the page: `Transcript` on frames no server produced, for the cases a healthy stream seldom shows.
TRANSCRIPT_CASES = """async ({text, length, sha256}) => {
  const { Transcript } = await import("/v1/client/tokenfan.js");
  const g = "gen_01M90AAAAAAAAAAAAAAAAAAAAA", base = { session_id: "s", generation_id: g };
  const at = (n) => `e1:${1000 + n}-0`;
  const frames = [
    { ...base, offset: at(1), seq: 1, type: "generation.started", attempt: 1 },
    { ...base, offset: at(2), seq: 2, type: "delta", content: "lost to a crash" },
    { ...base, offset: at(3), seq: 3, type: "generation.restarted", attempt: 2 },
    { ...base, offset: at(4), seq: 4, type: "delta", content: text.slice(0, 9) },
    { ...base, offset: at(5), seq: 5, type: "delta", content: text.slice(9) },
    { ...base, offset: at(6), seq: 6, type: "generation.completed", length, sha256 },
  ];
  const transcript = new Transcript();
  frames.forEach((frame) => transcript.apply(frame));
  const done = transcript.generations.get(g);
  const verification = await done.verification;
  const restarted = { content: done.content, restarts: done.restarts, ok: verification.ok, sha256: verification.sha256 };
  transcript.apply({ type: "snapshot", offset: at(7), session_id: "s", generations: [
    { generation_id: g, status: "running", text: "from the snapshot", reasoning: "why", tool_calls: [], seq: 7, attempt: 1 }] });
  const after = transcript.generations.get(g);
  const snapshot = { content: after.content, reasoning: after.reasoning, lastSeq: after.lastSeq, fromSnapshot: after.fromSnapshot };
  const refused = (frame) => { try { transcript.apply(frame); return "accepted"; } catch (error) { return error.name; } };
  const duplicate = refused({ ...base, offset: at(7), seq: 8, type: "delta", content: "x" });
  const gap = refused({ ...base, offset: at(9), seq: 10, type: "delta", content: "x" });
  const other = new Transcript();
  frames.slice(0, 5).forEach((frame) => other.apply(frame));
  other.apply({ ...frames[5], length: length + 1 });
  const mismatch = (await other.generations.get(g).verification).ok;
  return { restarted, snapshot, duplicate, gap, mismatch };
}"""
