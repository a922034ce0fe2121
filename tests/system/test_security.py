"""Security as an attacker, and a user, notice it: real processes configured as in production.

One secure stack carries most checks, configured as production should be: API keys (one configured as a
digest), two token secrets (rotation), an allowed browser origin, debug logging (the most a log can hold),
a Redis that requires a password and is reached only over TLS (`rediss://`, through a TLS proxy: the
embedded Valkey has no TLS), and a simulator that requires the upstream key. A second pair of front ends
with tiny limits (rate, connections per address) shares its Redis and workers. The shared test `stack`
runs in development mode and is not used here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import secrets
import ssl
import sys
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import jwt
import pytest
import trustme
from arq.connections import create_pool
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from tests.support.delivery import transcript_of
from tests.support.requests import accept, bearer, expected_text, new_session_id, user_message
from tests.support.sse import CredentialSseWatcher
from tests.support.stack import RunningStack, clean_environment, start_frontends
from tests.support.tls import TlsProxy
from tests.support.waiting import Closer, wait_for_condition
from tests.support.watchers import (
    CredentialMultiWatcher,
    CredentialWatcher,
    Watcher,
    close_reason,
    finished,
    handshake_refusal,
    http_url,
    stream_url,
)
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.client import SessionStream
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_generation_id
from tokenfan.runtime.auth import TokenSigner, new_api_key, new_token_secret
from tokenfan.runtime.settings import Secret
from tokenfan.store import redis_client
from tokenfan.store.jobs import queue_settings

# Fresh credentials per run, each recognizable, so that any log line or body holding one is found.
ALPHA_KEY = new_api_key()  # configured as alpha:<key>
BETA_KEY = new_api_key()  # configured only as its digest: beta:sha256:<hex>
WRONG_KEY = new_api_key()  # shaped like a real key, configured nowhere
GAMMA_KEY = new_api_key()  # the limited front ends' keys
DELTA_KEY = new_api_key()
SIGNING_SECRET = new_token_secret()  # the first secret signs
OLD_SECRET = new_token_secret()  # the second still verifies (rotation)
REDIS_PASSWORD = "redis-pw-" + secrets.token_hex(16)
UPSTREAM_KEY = "sk-upstream-" + secrets.token_hex(20)
APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"
TTL = 900

#: Every session token this module was handed or minted: none may reach a log.
SEEN_TOKENS: list[str] = []


def secure_env(api_keys: str, **extra: str) -> dict[str, str]:
    return {
        "TOKENFAN_INSECURE_DEV_MODE": "false",
        "TOKENFAN_API_KEYS": api_keys,
        "TOKENFAN_TOKEN_SECRETS": f"{SIGNING_SECRET},{OLD_SECRET}",
        "TOKENFAN_TOKEN_TTL_SECONDS": str(TTL),
        "TOKENFAN_ALLOWED_ORIGINS": APP_ORIGIN,
        **extra,
    }


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mint(session_id: str, *, secret: str = SIGNING_SECRET, now: float | None = None) -> str:
    token, _ = TokenSigner(Secret(secret), TTL).mint(session_id, subject="test", now=now)
    SEEN_TOKENS.append(token)
    return token


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def secure_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def certificate_authority(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture(scope="module")
def tls_proxy(
    secure_redis: EmbeddedRedis, certificate_authority: tuple[trustme.CA, Path]
) -> Iterator[TlsProxy]:
    """TLS in front of the Redis (the embedded build has none), with a certificate for 127.0.0.1."""
    authority, _ = certificate_authority
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    proxy = TlsProxy(secure_redis.host, secure_redis.port, context).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def secure(tls_proxy: TlsProxy, certificate_authority: tuple[trustme.CA, Path]) -> Iterator[RunningStack]:
    """The stack as production should run it. Its Redis needs a password and is reached over TLS only, with
    the URL docs/SECURITY.md recommends: our CA, and the server's name checked against its certificate."""
    _, ca_path = certificate_authority
    stack = RunningStack(
        redis_url=(
            f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{tls_proxy.port}/0"
            f"?ssl_ca_certs={ca_path}&ssl_check_hostname=true"
        ),
        extra_env=secure_env(
            f"alpha:{ALPHA_KEY},beta:sha256:{sha256_hex(BETA_KEY)}",
            OPENAI_API_KEY=UPSTREAM_KEY,
            TOKENFAN_LOG_LEVEL="debug",  # the most a log ever holds: what an operator troubleshooting sees
        ),
    )
    stack.start(keyed_simulator=True)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def limited(secure: RunningStack) -> Iterator[RunningStack]:
    """An API and a relay with tiny limits, beside `secure` (its Redis, its workers)."""
    front = start_frontends(
        secure,
        secure_env(
            f"gamma:{GAMMA_KEY},delta:{DELTA_KEY}",
            TOKENFAN_RATE_LIMIT_PER_MINUTE="30",  # bursts of 3
            TOKENFAN_RELAY_MAX_CONNECTIONS_PER_ADDRESS="3",
            TOKENFAN_SSE_MAX_STREAMS_PER_ADDRESS="2",
        ),
    )
    try:
        yield front
    finally:
        front.stop()


@pytest.fixture
async def service(secure: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    """The API as a backend service calls it: with an API key."""
    async with httpx.AsyncClient(base_url=secure.api_url, headers=bearer(ALPHA_KEY), timeout=10) as client:
        yield client


@pytest.fixture
async def anonymous(secure: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=secure.api_url, timeout=10) as client:
        yield client


async def finished_generation(
    secure: RunningStack, service: httpx.AsyncClient, session_id: str, text: str = "hello"
) -> tuple[str, str, dict[str, Any]]:
    """Accept a generation with the API key, watch it end; returns (generation id, its token, body)."""
    body = user_message(text)
    watcher = await Watcher(secure.relay_url, session_id).connect(credential=ALPHA_KEY)
    try:
        response = await service.post(f"/v1/sessions/{session_id}/generations", json=body)
        assert response.status_code == 202, response.text
        accepted = response.json()
        await watcher.receive_until(finished(accepted["generation_id"]))
    finally:
        await watcher.close()
    generation = watcher.transcript().generations[accepted["generation_id"]]
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    SEEN_TOKENS.append(accepted["token"])
    return accepted["generation_id"], accepted["token"], body


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


# ------------------------------------------------------------------------------------------------ start-up


async def exit_of(role: str, env: dict[str, str]) -> tuple[int | None, str]:
    """Run ``python -m tokenfan ROLE`` to its end (bounded); its exit code and what it printed on stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenfan", role, "--port", "0",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            _, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"tokenfan {role} started instead of refusing to") from None
    return process.returncode, stderr.decode()


async def test_the_servers_refuse_to_start_without_api_keys_or_token_secrets() -> None:
    no_keys = clean_environment()
    no_secrets = {**no_keys, "TOKENFAN_API_KEYS": f"alpha:{ALPHA_KEY}"}
    runs = [(role, env) for env in (no_keys, no_secrets) for role in ("api", "relay")]
    results = await asyncio.gather(*(exit_of(role, env) for role, env in runs))
    for (role, env), (code, stderr) in zip(runs, results, strict=True):
        assert code == 2, (role, stderr)
        if env is no_keys:
            assert "TOKENFAN_API_KEYS" in stderr, (role, stderr)
            assert "TOKENFAN_INSECURE_DEV_MODE" in stderr, (role, stderr)  # the way out is named too
        else:
            assert "TOKENFAN_TOKEN_SECRETS" in stderr, (role, stderr)
            assert ALPHA_KEY not in stderr


# ------------------------------------------------------------------------------------------------ HTTP API


async def test_every_endpoint_without_a_credential_is_a_401_with_the_documented_body(
    anonymous: httpx.AsyncClient,
) -> None:
    session_id, generation_id = new_session_id(), new_generation_id()
    requests = [
        ("POST", f"/v1/sessions/{session_id}/generations", user_message("hi")),
        ("POST", f"/v1/sessions/{session_id}/tokens", None),
        ("GET", f"/v1/sessions/{session_id}", None),
        ("GET", f"/v1/sessions/{session_id}/events", None),
        ("GET", f"/v1/generations/{generation_id}", None),
        ("POST", f"/v1/generations/{generation_id}/cancel", None),
        ("POST", "/v1/chat/completions", user_message("hi")),
        ("GET", f"/v1/chat/completions/chatcmpl-{generation_id[4:]}", None),
        ("POST", "/v1/responses", {"model": "tokenfan-sim", "input": "hi"}),
        ("GET", f"/v1/responses/resp_{generation_id[4:]}", None),
        ("POST", f"/v1/responses/resp_{generation_id[4:]}/cancel", None),
    ]
    for method, path, body in requests:
        response = await anonymous.request(method, path, json=body)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer", path


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"Bearer {WRONG_KEY}", id="unknown-key"),
        pytest.param(f"Bearer {ALPHA_KEY[:-1]}", id="key-minus-its-last-character"),
        pytest.param(f"Bearer {ALPHA_KEY}x", id="key-plus-a-character"),
        pytest.param(f"Bearer {sha256_hex(BETA_KEY)}", id="the-configured-digest-itself"),
        pytest.param(f"Bearer sha256:{sha256_hex(BETA_KEY)}", id="the-configured-entry-itself"),
        pytest.param(f"Basic {base64.b64encode(f'alpha:{ALPHA_KEY}'.encode()).decode()}", id="basic-scheme"),
        pytest.param("Bearer", id="bearer-without-credential"),
    ],
)
async def test_anything_but_a_configured_key_is_a_401(
    anonymous: httpx.AsyncClient, authorization: str
) -> None:
    response = await anonymous.post(
        f"/v1/sessions/{new_session_id()}/generations",
        json=user_message("hi"),
        headers={"Authorization": authorization},
    )
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_health_is_open_but_the_schema_and_docs_need_a_credential(
    anonymous: httpx.AsyncClient, service: httpx.AsyncClient
) -> None:
    assert (await anonymous.get("/healthz")).status_code == 200
    assert (await anonymous.get("/readyz")).status_code == 200
    for path in ("/openapi.json", "/docs"):
        assert_error(await anonymous.get(path), 401, "unauthorized")
        assert_error(await anonymous.get(path, headers=bearer(WRONG_KEY)), 401, "unauthorized")
        assert (await service.get(path)).status_code == 200, path
    schema = (await service.get("/openapi.json")).json()
    assert "/v1/sessions/{session_id}/generations" in schema["paths"]


@pytest.mark.parametrize("key", [ALPHA_KEY, BETA_KEY], ids=["plain-entry", "sha256-entry"])
async def test_each_configured_key_enqueues_and_gets_a_session_token(secure: RunningStack, key: str) -> None:
    session_id = new_session_id()
    body = user_message("rotation")
    async with httpx.AsyncClient(base_url=secure.api_url, headers=bearer(key), timeout=10) as client:
        before = time.time()
        response = await client.post(f"/v1/sessions/{session_id}/generations", json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    token, expires_at = accepted["token"], accepted["token_expires_at"]
    SEEN_TOKENS.append(token)
    assert isinstance(token, str)
    assert token.count(".") == 2
    assert before + TTL - 2 <= expires_at <= time.time() + TTL + 2
    # The token is what a browser uses: it watches this session to the end.
    watcher = await CredentialWatcher(secure.relay_url, session_id).connect_with(query_token=token)
    try:
        await watcher.receive_until(finished(accepted["generation_id"]))
    finally:
        await watcher.close()
    assert watcher.transcript().generations[accepted["generation_id"]].text == expected_text(body)


async def test_only_an_api_key_mints_tokens(service: httpx.AsyncClient) -> None:
    session_id = new_session_id()
    minted = await service.post(f"/v1/sessions/{session_id}/tokens")
    assert minted.status_code == 201, minted.text
    grant = minted.json()
    SEEN_TOKENS.append(grant["token"])
    assert grant["session_id"] == session_id
    assert grant["expires_at"] > time.time()

    by_token = await service.post(f"/v1/sessions/{session_id}/tokens", headers=bearer(grant["token"]))
    assert_error(by_token, 403, "forbidden")


async def test_a_session_token_watches_its_own_session_and_nothing_else(
    secure: RunningStack, service: httpx.AsyncClient, anonymous: httpx.AsyncClient, opened: Closer
) -> None:
    session_a, session_b = new_session_id(), new_session_id()
    generation_a, token_a, body_a = await finished_generation(secure, service, session_a, "session A")
    generation_b, _, _ = await finished_generation(secure, service, session_b, "session B")
    as_a = bearer(token_a)

    # What it may do: read its session and its generations, and stream them (header or ?token=).
    session = await anonymous.get(f"/v1/sessions/{session_a}", headers=as_a)
    assert session.status_code == 200, session.text
    assert [g["generation_id"] for g in session.json()["generations"]] == [generation_a]
    generation = await anonymous.get(f"/v1/generations/{generation_a}", headers=as_a)
    assert generation.status_code == 200, generation.text
    assert generation.json()["text"] == expected_text(body_a)
    assert (await anonymous.get(f"/v1/sessions/{session_a}", params={"token": token_a})).status_code == 200
    for sse in (
        CredentialSseWatcher(secure.api_url, session_a, headers=as_a),
        CredentialSseWatcher(secure.api_url, session_a, params={"token": token_a}),
    ):
        await opened(sse).connect()
        await sse.receive_until(finished(generation_a))
        assert sse.transcript().generations[generation_a].text == expected_text(body_a)
        await sse.close()

    # What it may not do: act as a service, or look at another session.
    refused = [
        await anonymous.post(f"/v1/sessions/{session_a}/generations", json=user_message("x"), headers=as_a),
        await anonymous.post(f"/v1/generations/{generation_a}/cancel", headers=as_a),
        await anonymous.post(f"/v1/sessions/{session_a}/tokens", headers=as_a),
        await anonymous.get(f"/v1/sessions/{session_b}", headers=as_a),
        await anonymous.get(f"/v1/sessions/{session_b}", params={"token": token_a}),
    ]
    for response in refused:
        assert_error(response, 403, "forbidden")
    for sse in (
        CredentialSseWatcher(secure.api_url, session_b, headers=as_a),
        CredentialSseWatcher(secure.api_url, session_b, params={"token": token_a}),
    ):
        status, body = await opened(sse).refusal()
        assert status == 403
        assert body["error"]["code"] == "forbidden"

    # Another session's generation looks exactly like one that does not exist: nothing leaks.
    elsewhere = await anonymous.get(f"/v1/generations/{generation_b}", headers=as_a)
    unknown_id = new_generation_id()
    unknown = await anonymous.get(f"/v1/generations/{unknown_id}", headers=as_a)
    assert_error(elsewhere, 404, "generation_not_found")
    assert_error(unknown, 404, "generation_not_found")
    assert elsewhere.json()["error"]["message"].replace(generation_b, "ID") == unknown.json()["error"][
        "message"
    ].replace(unknown_id, "ID")
    # ...and the generation was not cancelled by the refused request.
    after = await service.get(f"/v1/generations/{generation_a}")
    assert after.json()["status"] == "completed"


async def test_the_openai_front_door_creates_with_an_api_key_and_lets_a_token_read_its_session_only(
    service: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    session_a, session_b = new_session_id(), new_session_id()
    created = []
    for session_id in (session_a, session_b):
        response = await service.post(
            "/v1/responses",
            json={"model": "tokenfan-sim", "input": f"for {session_id}"},
            headers={"X-Tokenfan-Session": session_id},
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "completed"
        created.append(response.json())
    token_a = (await service.post(f"/v1/sessions/{session_a}/tokens")).json()["token"]
    SEEN_TOKENS.append(token_a)
    as_a = bearer(token_a)
    mine = await anonymous.get(f"/v1/responses/{created[0]['id']}", headers=as_a)
    assert mine.status_code == 200, mine.text
    assert mine.json()["output"] == created[0]["output"]
    chat_id = "chatcmpl-" + created[0]["id"].removeprefix("resp_")
    assert (await anonymous.get(f"/v1/chat/completions/{chat_id}", headers=as_a)).status_code == 200
    refused = [
        await anonymous.post("/v1/chat/completions", json=user_message("x"), headers=as_a),
        await anonymous.post("/v1/responses", json={"model": "tokenfan-sim", "input": "x"}, headers=as_a),
        await anonymous.post(f"/v1/responses/{created[0]['id']}/cancel", headers=as_a),
    ]
    for response in refused:
        assert_error(response, 403, "forbidden")
    # Another session's response looks exactly like one that does not exist.
    assert_error(
        await anonymous.get(f"/v1/responses/{created[1]['id']}", headers=as_a), 404, "response_not_found"
    )


def _segment(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def bad_token(kind: str, session_id: str) -> str:
    """A token that must not be accepted, of one kind of attack or mistake."""
    now = int(time.time())
    claims = {"iss": "tokenfan", "sub": session_id, "scope": "subscribe", "iat": now, "exp": now + 600}

    def signed(changes: dict[str, Any], algorithm: str = "HS256") -> str:
        values = {key: value for key, value in {**claims, **changes}.items() if value is not None}
        with warnings.catch_warnings():  # HS512 wants a longer key; the attacker does not care
            warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
            return jwt.encode(values, SIGNING_SECRET, algorithm=algorithm)

    def tampered() -> str:
        header, _, signature = mint(new_session_id()).split(".")
        return f"{header}.{_segment(claims)}.{signature}"

    makers: dict[str, Callable[[], str]] = {
        "expired": lambda: mint(session_id, now=time.time() - 3600),
        "foreign-secret": lambda: mint(session_id, secret=new_token_secret()),
        "malformed": lambda: "not.a.token",
        "truncated-signature": lambda: mint(session_id)[:-6],
        "alg-none": lambda: f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(claims)}.",
        "tampered-subject": tampered,
        "wrong-scope": lambda: signed({"scope": "admin"}),
        "no-expiry": lambda: signed({"exp": None}),
        "wrong-issuer": lambda: signed({"iss": "someone-else"}),
        "hs512": lambda: signed({}, algorithm="HS512"),  # not the configured algorithm
    }
    return makers[kind]()


BAD_TOKENS = [
    "expired",
    "foreign-secret",
    "malformed",
    "truncated-signature",
    "alg-none",
    "tampered-subject",
    "wrong-scope",
    "no-expiry",
    "wrong-issuer",
    "hs512",
]


@pytest.mark.parametrize("kind", BAD_TOKENS)
async def test_bad_tokens_are_refused_by_the_api_and_the_relay(
    secure: RunningStack, anonymous: httpx.AsyncClient, kind: str
) -> None:
    session_id = new_session_id()
    token = bad_token(kind, session_id)
    assert_error(
        await anonymous.get(f"/v1/sessions/{session_id}", headers=bearer(token)), 401, "unauthorized"
    )
    sse = await anonymous.get(f"/v1/sessions/{session_id}/events", params={"token": token})
    assert_error(sse, 401, "unauthorized")
    url = f"{stream_url(secure.relay_url, session_id)}?token={token}"
    code, reason = await close_reason(url)
    assert code == 4401
    assert reason


async def test_a_token_signed_with_the_second_secret_is_still_accepted(
    secure: RunningStack, service: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    generation_id, _, body = await finished_generation(secure, service, session_id)
    old = mint(session_id, secret=OLD_SECRET)
    response = await anonymous.get(f"/v1/sessions/{session_id}", headers=bearer(old))
    assert response.status_code == 200, response.text
    watcher = await CredentialWatcher(secure.relay_url, session_id).connect_with(query_token=old)
    try:
        await watcher.receive_until(finished(generation_id))
    finally:
        await watcher.close()
    assert watcher.transcript().generations[generation_id].text == expected_text(body)


async def test_the_rate_limit_is_per_api_key(limited: RunningStack) -> None:
    session_id = new_session_id()
    path = f"/v1/sessions/{session_id}/generations"
    async with (
        httpx.AsyncClient(base_url=limited.api_url, headers=bearer(GAMMA_KEY), timeout=10) as gamma,
        httpx.AsyncClient(base_url=limited.api_url, headers=bearer(DELTA_KEY), timeout=10) as delta,
    ):
        # 30 a minute passes bursts of a tenth of a minute's worth: 3 in quick succession.
        for _ in range(3):
            accepted = await gamma.post(path, json=user_message("burst"))
            assert accepted.status_code == 202, accepted.text
        refused = await gamma.post(path, json=user_message("one too many"))
        assert_error(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 2  # one request's share of the minute: 2 s
        # Another key has its own allowance.
        assert (await delta.post(path, json=user_message("other key"))).status_code == 202
        # A refused request enqueued nothing: the session holds the 3 + 1 accepted generations only.
        session = await gamma.get(f"/v1/sessions/{session_id}")
        assert len(session.json()["generations"]) == 4


# ------------------------------------------------------------------------------------------------ relay


async def test_the_relay_closes_4401_without_a_credential(secure: RunningStack) -> None:
    code, reason = await close_reason(stream_url(secure.relay_url, new_session_id()))
    assert code == 4401
    assert "token" in reason.lower() or "key" in reason.lower()


@pytest.mark.parametrize(
    "how",
    ["unknown-key-header", "unknown-key-query", "forged-token", "expired-token", "malformed-token"],
)
async def test_the_relay_closes_4401_for_unknown_keys_and_bad_tokens(secure: RunningStack, how: str) -> None:
    session_id = new_session_id()
    url = stream_url(secure.relay_url, session_id)
    options: dict[str, Any] = {}
    if how == "unknown-key-header":
        options["additional_headers"] = bearer(WRONG_KEY)
    else:
        token = {
            "unknown-key-query": WRONG_KEY,
            "forged-token": bad_token("foreign-secret", session_id),
            "expired-token": bad_token("expired", session_id),
            "malformed-token": "a.b.c",
        }[how]
        url += f"?token={token}"
    code, reason = await close_reason(url, **options)
    assert code == 4401
    assert reason


async def test_the_relay_closes_4403_for_a_token_of_another_session(secure: RunningStack) -> None:
    other = mint(new_session_id())
    url = f"{stream_url(secure.relay_url, new_session_id())}?token={other}"
    code, reason = await close_reason(url)
    assert code == 4403
    assert reason
    code, _ = await close_reason(
        stream_url(secure.relay_url, new_session_id()), additional_headers=bearer(other)
    )
    assert code == 4403


async def test_the_relay_takes_a_token_in_the_query_or_the_header_and_an_api_key(
    secure: RunningStack, service: httpx.AsyncClient, opened: Closer
) -> None:
    session_id = new_session_id()
    minted = await service.post(f"/v1/sessions/{session_id}/tokens")
    token = minted.json()["token"]
    SEEN_TOKENS.append(token)
    watchers = [
        await opened(CredentialWatcher(secure.relay_url, session_id)).connect_with(query_token=token),
        await opened(CredentialWatcher(secure.relay_url, session_id)).connect_with(header=token),
        await opened(CredentialWatcher(secure.relay_url, session_id)).connect_with(header=ALPHA_KEY),
        await opened(CredentialWatcher(secure.relay_url, session_id)).connect_with(header=BETA_KEY),
    ]
    body = user_message("four ways in")
    generation_id = await accept(service, session_id, body)
    for watcher in watchers:
        await watcher.receive_until(finished(generation_id))
        assert watcher.transcript().generations[generation_id].text == expected_text(body)


async def test_relay_stats_need_an_api_key(secure: RunningStack) -> None:
    token = mint(new_session_id())
    async with httpx.AsyncClient(base_url=http_url(secure.relay_url), timeout=10) as relay:
        assert (await relay.get("/healthz")).status_code == 200
        assert (await relay.get("/stats")).status_code == 401
        assert (await relay.get("/stats", headers=bearer(WRONG_KEY))).status_code == 401
        assert (await relay.get("/stats", headers=bearer(token))).status_code == 403
        stats = await relay.get("/stats", headers=bearer(ALPHA_KEY))
    assert stats.status_code == 200
    assert isinstance(stats.json()["connections"], int)


async def test_a_multi_session_subscribe_carries_its_own_token(
    secure: RunningStack, service: httpx.AsyncClient, opened: Closer
) -> None:
    session_a, session_b = new_session_id(), new_session_id()
    token_a, token_b = mint(session_a), mint(session_b)
    multi = await opened(CredentialMultiWatcher(secure.relay_url)).connect_with()  # no credential at all

    no_token = await multi.request({"type": "subscribe", "session_id": session_b})
    assert (no_token["type"], no_token["code"]) == ("error", 4401)
    wrong_token = await multi.request({"type": "subscribe", "session_id": session_b, "token": token_a})
    assert (wrong_token["type"], wrong_token["code"]) == ("error", 4403)
    bad = await multi.request({"type": "subscribe", "session_id": session_b, "token": WRONG_KEY})
    assert (bad["type"], bad["code"]) == ("error", 4401)
    for session_id, token in ((session_a, token_a), (session_b, token_b)):
        answer = await multi.request({"type": "subscribe", "session_id": session_id, "token": token})
        assert answer == {"type": "subscribed", "session_id": session_id}

    since = len(multi.messages)
    bodies = {session_a: user_message("multi A"), session_b: user_message("multi B")}
    generations = {sid: await accept(service, sid, body) for sid, body in bodies.items()}
    await multi.receive_until(
        lambda _: all(finished(gid)(multi.frames(sid, since)) for sid, gid in generations.items())
    )
    for session_id, generation_id in generations.items():
        transcript = transcript_of(multi.frames(session_id, since))
        assert transcript.generations[generation_id].text == expected_text(bodies[session_id])


async def test_a_multi_session_connection_is_as_strong_as_its_credential(
    secure: RunningStack, opened: Closer
) -> None:
    session_a, session_b = new_session_id(), new_session_id()
    with_key = await opened(CredentialMultiWatcher(secure.relay_url)).connect_with(header=ALPHA_KEY)
    for session_id in (session_a, session_b):
        assert (await with_key.subscribe(session_id))["type"] == "subscribed"

    with_token = await opened(CredentialMultiWatcher(secure.relay_url)).connect_with(
        query_token=mint(session_a)
    )
    assert (await with_token.subscribe(session_a))["type"] == "subscribed"
    other = await with_token.subscribe(session_b)
    assert (other["type"], other["code"]) == ("error", 4403)


async def test_the_relay_refuses_browser_origins_that_are_not_allowed(secure: RunningStack) -> None:
    url = f"{secure.relay_url}/v1/stream"
    evil = await handshake_refusal(url, origin=Origin(EVIL_ORIGIN), additional_headers=bearer(ALPHA_KEY))
    assert evil == 403
    assert await handshake_refusal(url, origin=Origin("null")) == 403  # sandboxed frames, file:// pages
    assert await handshake_refusal(url, origin=Origin(APP_ORIGIN + ".evil.example")) == 403
    # The allowed origin, and clients that send no Origin at all (not a browser), pass.
    for origin in (Origin(APP_ORIGIN), None):
        async with connect(url, origin=origin, additional_headers=bearer(ALPHA_KEY)) as websocket:
            await websocket.send(json.dumps({"type": "subscribe", "session_id": new_session_id()}))
            assert json.loads(await websocket.recv())["type"] == "subscribed"


async def test_cors_answers_only_the_allowed_origin(anonymous: httpx.AsyncClient) -> None:
    path = f"/v1/sessions/{new_session_id()}/generations"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = await anonymous.options(path, headers={"Origin": APP_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    denied = await anonymous.options(path, headers={"Origin": EVIL_ORIGIN, **preflight})
    assert "access-control-allow-origin" not in denied.headers
    assert denied.status_code >= 400
    # A simple request from another origin gets no CORS grant either: the browser hides the answer.
    simple = await anonymous.get("/healthz", headers={"Origin": EVIL_ORIGIN})
    assert "access-control-allow-origin" not in simple.headers
    simple = await anonymous.get("/healthz", headers={"Origin": APP_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == APP_ORIGIN


async def test_connections_per_address_are_capped(limited: RunningStack, opened: Closer) -> None:
    url = f"{limited.relay_url}/v1/stream"

    async def open_connections() -> int:
        async with httpx.AsyncClient(
            base_url=http_url(limited.relay_url), headers=bearer(GAMMA_KEY)
        ) as relay:
            connections: int = (await relay.get("/stats")).json()["connections"]
            return connections

    held = []
    for _ in range(3):
        multi = await opened(CredentialMultiWatcher(limited.relay_url)).connect_with(header=GAMMA_KEY)
        held.append(multi)

    async def three_open() -> bool:
        return await open_connections() == 3

    await wait_for_condition(three_open)
    assert await handshake_refusal(url, additional_headers=bearer(GAMMA_KEY)) == 429
    assert await handshake_refusal(stream_url(limited.relay_url, new_session_id())) == 429
    # The cap counts open connections: closing one lets the next one in.
    await held[0].close()

    async def two_open() -> bool:
        return await open_connections() == 2

    await wait_for_condition(two_open)
    again = await opened(CredentialMultiWatcher(limited.relay_url)).connect_with(header=GAMMA_KEY)
    assert (await again.subscribe(new_session_id()))["type"] == "subscribed"


async def test_sse_streams_per_address_are_capped(limited: RunningStack, opened: Closer) -> None:
    session_id = new_session_id()
    held = [
        await opened(CredentialSseWatcher(limited.api_url, session_id, headers=bearer(GAMMA_KEY))).connect()
        for _ in range(2)
    ]
    for sse in held:  # each is really streaming: its first block (retry:) arrived
        await sse.receive_blocks_until(lambda blocks: bool(blocks))
    for headers in (bearer(GAMMA_KEY), {**bearer(GAMMA_KEY), "X-Forwarded-For": "203.0.113.9"}):
        third = opened(CredentialSseWatcher(limited.api_url, session_id, headers=headers))
        status, body = await third.refusal()
        assert status == 429  # a forwarded-for header that anyone can send does not make another client
        assert body["error"]["code"] == "rate_limited"
    # The cap counts open streams: closing one lets the next one in.
    await held[0].close()

    async def admitted() -> bool:
        attempt = CredentialSseWatcher(limited.api_url, session_id, headers=bearer(GAMMA_KEY))
        try:
            return (await attempt.open()).status_code == 200
        finally:
            await attempt.close()

    await wait_for_condition(admitted)


async def test_a_message_flood_is_closed_with_4429(secure: RunningStack) -> None:
    answers = 0
    async with connect(f"{secure.relay_url}/v1/stream", additional_headers=bearer(ALPHA_KEY)) as websocket:
        with pytest.raises(ConnectionClosed) as closed:  # noqa: PT012 - the loop ends when the relay closes
            async with asyncio.timeout(20):
                for _ in range(300):  # as fast as the relay answers
                    await websocket.send(json.dumps({"type": "unsubscribe", "session_id": "flood"}))
                    assert json.loads(await websocket.recv())["type"] == "unsubscribed"
                    answers += 1
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4429
    assert closed.value.rcvd.reason
    # 20 a second with bursts of 5 seconds' worth: the first 100 or so pass, not all 300.
    assert 100 <= answers < 300


async def test_a_client_that_pipelines_a_flood_learns_of_its_4429_promptly(secure: RunningStack) -> None:
    """The relay sends 4429 at once, but the client's recv() reports it only when the closing handshake
    ends, and that needs the relay to read the client's close reply, which waits behind the flood."""
    websocket = await connect(f"{secure.relay_url}/v1/stream", additional_headers=bearer(ALPHA_KEY))
    message = json.dumps({"type": "unsubscribe", "session_id": "flood"})
    try:
        with contextlib.suppress(ConnectionClosed):  # then recv() reports it
            for _ in range(300):  # pipelined: sent without waiting for the answers
                await websocket.send(message)
        answers = 0
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionClosed) as closed:  # noqa: PT012 - reading until the relay closes
                while True:
                    assert json.loads(await websocket.recv())["type"] == "unsubscribed"
                    answers += 1
    except TimeoutError:
        raise AssertionError(
            f"{answers} answers, then no close within 5 s (the relay's closing handshake waits for its "
            "close timeout: it no longer reads the flooding client)"
        ) from None
    finally:
        websocket.transport.abort()  # a clean close would wait for that same timeout
        await websocket.wait_closed()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4429


async def test_a_message_over_the_size_limit_is_closed_with_1009(secure: RunningStack) -> None:
    async with connect(f"{secure.relay_url}/v1/stream", additional_headers=bearer(ALPHA_KEY)) as websocket:
        await websocket.send("x" * 16_384)  # at the limit: answered, as any malformed message
        answer = json.loads(await websocket.recv())
        assert (answer["type"], answer["code"]) == ("error", 4400)
        await websocket.send("x" * 16_385)
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


# ------------------------------------------------------------------------------------------------ secrets


async def test_redis_demands_the_password_the_stack_uses(secure_redis: EmbeddedRedis) -> None:
    stranger = Redis(host=secure_redis.host, port=secure_redis.port)
    try:
        with pytest.raises(AuthenticationError):
            await stranger.ping()
    finally:
        await stranger.aclose()


async def test_a_redis_password_needing_percent_encoding_works_for_every_connection() -> None:
    """REDIS_URL is a URL: a password with '@', ':', '/', '%', '#' or '?' is written percent-encoded. The
    store's client and the queue's connection (the API enqueues, workers dequeue) must both decode it."""
    password = "p@ss:w/rd%#?" + secrets.token_hex(4)
    with EmbeddedRedis(password=password) as server:
        url = f"redis://:{quote(password, safe='')}@{server.host}:{server.port}/0"
        store = redis_client(url)
        try:
            assert await store.ping()
        finally:
            await store.aclose()
        settings = queue_settings(url)
        settings.conn_retries = 0  # a refusal is final: no need to wait through arq's retries
        try:
            queue = await create_pool(settings)
        except AuthenticationError:
            raise AssertionError("the queue connection failed AUTH with the password in REDIS_URL") from None
        try:
            assert await queue.ping()
        finally:
            await queue.aclose()


async def test_the_upstream_key_reaches_the_upstream_and_only_it(secure: RunningStack) -> None:
    request = {"model": "tokenfan-sim", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=secure.simulator_url, timeout=10) as upstream:
        refused = await upstream.post("/v1/chat/completions", json=request, headers=bearer("sk-wrong"))
        allowed = await upstream.post("/v1/chat/completions", json=request, headers=bearer(UPSTREAM_KEY))
    assert (
        refused.status_code == 401
    )  # so every completed generation of this module proves the worker sent it
    assert allowed.status_code == 200


async def test_no_secret_reaches_a_log_or_an_error_body(
    secure: RunningStack, service: httpx.AsyncClient, anonymous: httpx.AsyncClient, opened: Closer
) -> None:
    session_id, elsewhere = new_session_id(), new_session_id()
    generation_id, token, _ = await finished_generation(secure, service, session_id, "secrets")
    presented = [WRONG_KEY, ALPHA_KEY, BETA_KEY, token, bad_token("foreign-secret", session_id)]
    bodies: list[str] = []

    # Failed attempts with credentials that look real, in headers and in URLs.
    for credential in (WRONG_KEY, presented[-1], "x" * 30 + WRONG_KEY):
        for response in (
            await anonymous.post(
                f"/v1/sessions/{session_id}/generations", json=user_message("x"), headers=bearer(credential)
            ),
            await anonymous.get(f"/v1/sessions/{session_id}", params={"token": credential}),
            await anonymous.get(f"/v1/sessions/{session_id}/events", params={"token": credential}),
        ):
            assert response.status_code == 401
            bodies.append(response.text)
        bodies.append(
            (await close_reason(f"{stream_url(secure.relay_url, session_id)}?token={credential}"))[1]
        )
    # Valid credentials used where they do not reach: a token for another session, a key in a URL.
    bodies.append((await anonymous.get(f"/v1/sessions/{elsewhere}/events", params={"token": token})).text)
    bodies.append((await close_reason(f"{stream_url(secure.relay_url, elsewhere)}?token={token}"))[1])
    too_long = await anonymous.get(f"/v1/sessions/{session_id}", params={"token": WRONG_KEY * 200})
    assert too_long.status_code in (401, 422)
    bodies.append(too_long.text)
    keyed_url = await anonymous.get(f"/v1/sessions/{session_id}", params={"token": ALPHA_KEY})
    assert keyed_url.status_code == 401  # an API key in a URL is refused: URLs reach proxy logs
    multi = await opened(CredentialMultiWatcher(secure.relay_url)).connect_with()
    for credential in (WRONG_KEY, token):
        answer = await multi.request({"type": "subscribe", "session_id": elsewhere, "token": credential})
        assert answer["type"] == "error"
        bodies.append(json.dumps(answer))
    # Tokens in URLs that work: SSE and relay.
    sse = await opened(CredentialSseWatcher(secure.api_url, session_id, params={"token": token})).connect()
    await sse.receive_until(finished(generation_id))
    watcher = await opened(CredentialWatcher(secure.relay_url, session_id)).connect_with(query_token=token)
    await watcher.receive_until(finished(generation_id))
    # A generation that fails upstream, and request errors.
    failing = user_message("fail", {"status": 400})
    failed_id = await accept(service, session_id, failing)
    await watcher.receive_until(finished(failed_id))
    assert watcher.transcript().generations[failed_id].status is GenerationStatus.FAILED
    invalid = await service.post(f"/v1/sessions/{session_id}/generations", json={"model": 1, "token": token})
    assert invalid.status_code == 422
    bodies.append(invalid.text)

    for body in bodies:
        for secret in presented:
            assert secret not in body, f"an error answer echoes a credential: {body[:300]}"

    # Now the logs: every line every process wrote, with the request traffic above in them.
    marker = f"/v1/sessions/{new_session_id()}"
    assert (await service.get(marker)).status_code == 404
    await logged(secure, "api.log", marker)  # the API logs a request once it has answered it
    await logged(secure, "worker-*.log", failed_id)  # the worker's last words on the failed generation
    logs = {path.name: path.read_text(errors="replace") for path in sorted(secure.logs.glob("*.log"))}
    assert {"api.log", "relay.log", "simulator.log"} <= set(logs)
    assert re.search(r'"status": ?401', logs["api.log"]), "the API logged no refused request"
    assert any(name.startswith("worker") for name in logs)
    secrets_ = {
        "an API key": [ALPHA_KEY, BETA_KEY],
        "a presented unknown key": [WRONG_KEY],
        "a token secret": [SIGNING_SECRET, OLD_SECRET],
        "the Redis password": [REDIS_PASSWORD],
        "the upstream key": [UPSTREAM_KEY],
        "a session token": [*SEEN_TOKENS, *presented],
    }
    for name, values in secrets_.items():
        for value in values:
            for log_name, text in logs.items():
                assert value not in text, f"{log_name} holds {name}"
                # A token's signature alone is as good as a token to whoever can rebuild the rest.
                if value.count(".") == 2:
                    assert value.rsplit(".", 1)[1] not in text, f"{log_name} holds {name}'s signature"


async def logged(stack: RunningStack, pattern: str, text: str) -> None:
    """Wait until a process's log (a file name pattern) holds `text`; each line is written as it happens."""

    async def holds() -> bool:
        return any(text in path.read_text(errors="replace") for path in stack.logs.glob(pattern))

    await wait_for_condition(holds)


# ------------------------------------------------------------------------------------------------ Redis TLS


async def test_every_component_reaches_redis_over_tls(secure: RunningStack, tls_proxy: TlsProxy) -> None:
    session_id = new_session_id()
    body = user_message("over TLS")
    watcher = await Watcher(secure.relay_url, session_id).connect(credential=ALPHA_KEY)
    try:
        async with httpx.AsyncClient(
            base_url=secure.api_url, headers=bearer(ALPHA_KEY), timeout=10
        ) as client:
            generation_id = await accept(client, session_id, body)
            await watcher.receive_until(finished(generation_id))
            assert (await client.get("/readyz")).status_code == 200
            snapshot = await client.get(f"/v1/generations/{generation_id}")
    finally:
        await watcher.close()
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == expected_text(body)
    assert snapshot.json()["text"] == expected_text(body)
    # api (client and queue), relay, and worker (client, queue, arq): all went through the TLS proxy.
    assert tls_proxy.accepted >= 4
    # The proxy speaks nothing but TLS: a plain-text client gets nowhere.
    plain = Redis(host="127.0.0.1", port=tls_proxy.port, password=REDIS_PASSWORD, socket_timeout=5)
    try:
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await plain.ping()
    finally:
        await plain.aclose()


# ------------------------------------------------------------------------------------------------ token expiry

#: A generation that streams for about 3.2 s: longer than a short-lived token, so the token expires mid-way.
LONG_BODY = {"tokens": 80, "rate": 25}


def short_lived(session_id: str, seconds: float = 2.0) -> tuple[str, float]:
    """A token for `session_id` that expires within `seconds` (minted as if issued earlier), and when."""
    token, expires = TokenSigner(Secret(SIGNING_SECRET), TTL).mint(
        session_id, subject="test", now=time.time() - TTL + seconds
    )
    SEEN_TOKENS.append(token)
    return token, float(expires)


def events_only(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [frame for frame in frames if "offset" in frame]


def assert_exact_once(frames: list[dict[str, Any]], generation_id: str, body: dict[str, Any]) -> None:
    """No offset twice, offsets in order, and the generation's text exactly what the upstream produced."""
    offsets = [frame["offset"] for frame in frames]
    assert len(offsets) == len(set(offsets)), "a frame arrived twice"
    assert transcript_of(frames).generations[generation_id].text == expected_text(body)


async def test_a_stream_ends_when_its_token_does_and_resumes_with_a_fresh_one(
    secure: RunningStack, service: httpx.AsyncClient, opened: Closer
) -> None:
    session_id = new_session_id()
    token, expires = short_lived(session_id)
    watcher = await opened(Watcher(secure.relay_url, session_id)).connect(credential=token)
    body = user_message("outlives its token", LONG_BODY)
    generation_id = await accept(service, session_id, body)
    with pytest.raises(ConnectionClosed) as ended:
        await watcher.receive_until(lambda _: False)
    assert ended.value.rcvd is not None
    assert ended.value.rcvd.code == 4401
    assert "expired" in ended.value.rcvd.reason
    assert time.time() >= expires - 0.05, "closed before the token expired"
    assert not finished(generation_id)(watcher.frames), "the generation ended first: nothing was proven"
    assert watcher.frames, "nothing streamed before the expiry"

    await watcher.connect(after=watcher.last_offset, credential=mint(session_id))
    await watcher.receive_until(finished(generation_id))
    assert_exact_once(watcher.frames, generation_id, body)


async def test_a_refreshed_token_keeps_the_stream_open_past_the_old_expiry(
    secure: RunningStack, service: httpx.AsyncClient, opened: Closer
) -> None:
    session_id = new_session_id()
    token, expires = short_lived(session_id)
    watcher = await opened(Watcher(secure.relay_url, session_id)).connect(credential=token)
    assert watcher.connection is not None
    body = user_message("refreshed", LONG_BODY)
    generation_id = await accept(service, session_id, body)

    await watcher.connection.send(json.dumps({"type": "refresh", "token": mint(new_session_id())}))
    await watcher.receive_until(lambda frames: any(f["type"] == "error" for f in frames))
    refused = next(f for f in watcher.frames if f["type"] == "error")
    assert refused["code"] == 4403  # another session's token extends nothing, and closes nothing
    await watcher.connection.send(json.dumps({"type": "refresh", "token": mint(session_id)}))
    await watcher.receive_until(lambda frames: any(f["type"] == "refreshed" for f in frames))
    refreshed = next(f for f in watcher.frames if f["type"] == "refreshed")
    assert refreshed["session_id"] == session_id
    assert refreshed["expires_at"] > expires

    await watcher.receive_until(finished(generation_id))
    assert time.time() > expires, "the generation ended before the old token expired: nothing was proven"
    assert_exact_once(events_only(watcher.frames), generation_id, body)


async def test_a_multi_session_subscription_ends_with_its_token_and_the_others_go_on(
    secure: RunningStack, service: httpx.AsyncClient, opened: Closer
) -> None:
    short_session, long_session = new_session_id(), new_session_id()
    short_token, expires = short_lived(short_session)
    multi = await opened(CredentialMultiWatcher(secure.relay_url)).connect_with()
    # Watching nothing yet, a refresh only sets the connection's credential, and says so.
    assert await multi.request({"type": "refresh", "token": mint(long_session)}) == {
        "type": "refreshed",
        "expires_at": pytest.approx(time.time() + TTL, abs=5),
    }
    for session_id, token in ((short_session, short_token), (long_session, mint(long_session))):
        answer = await multi.request({"type": "subscribe", "session_id": session_id, "token": token})
        assert answer == {"type": "subscribed", "session_id": session_id}
    bodies = {sid: user_message(f"multi expiry {sid}", LONG_BODY) for sid in (short_session, long_session)}
    generations = {sid: await accept(service, sid, body) for sid, body in bodies.items()}

    await multi.receive_until(finished(generations[long_session]))
    errors = [m for m in multi.messages if m["type"] == "error"]
    assert [(e["session_id"], e["code"]) for e in errors] == [(short_session, 4401)]
    assert time.time() >= expires - 0.05
    cut = multi.frames(short_session)
    assert not finished(generations[short_session])(cut), "the generation ended first: nothing was proven"
    assert_exact_once(multi.frames(long_session), generations[long_session], bodies[long_session])

    since = len(multi.messages)
    again = await multi.request(
        {
            "type": "subscribe",
            "session_id": short_session,
            "token": mint(short_session),
            "after": cut[-1]["offset"],
        }
    )
    assert again == {"type": "subscribed", "session_id": short_session}
    await multi.receive_until(
        lambda _: finished(generations[short_session])(multi.frames(short_session, since))
    )
    assert_exact_once(
        cut + multi.frames(short_session, since), generations[short_session], bodies[short_session]
    )


async def test_an_sse_stream_ends_with_its_token_and_resumes_with_a_fresh_one(
    secure: RunningStack, service: httpx.AsyncClient, opened: Closer
) -> None:
    session_id = new_session_id()
    token, expires = short_lived(session_id)
    sse = await opened(CredentialSseWatcher(secure.api_url, session_id, headers=bearer(token))).connect()
    body = user_message("sse outlives its token", LONG_BODY)
    generation_id = await accept(service, session_id, body)
    await sse.receive_until(lambda frames: any(f.get("code") == 4401 for f in frames))
    assert sse.blocks[-1].event == "error"
    assert time.time() >= expires - 0.05
    with pytest.raises(AssertionError, match="ended the event stream"):
        await sse.next_block()  # and the response ends there
    shown = [json.loads("\n".join(b.data)) for b in sse.blocks if b.is_event and b.event != "error"]
    assert not finished(generation_id)(shown), "the generation ended first: nothing was proven"

    resumed = await opened(
        CredentialSseWatcher(
            secure.api_url, session_id, headers=bearer(mint(session_id)), last_event_id=shown[-1]["offset"]
        )
    ).connect()
    await resumed.receive_until(finished(generation_id))
    assert_exact_once(shown + resumed.frames, generation_id, body)


async def test_the_client_library_outlives_short_tokens_with_a_credential_function(
    secure: RunningStack, service: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    minted: list[float] = []

    def fresh_token() -> str:
        token, expires = short_lived(session_id, 1.5)
        minted.append(expires)
        return token

    stream = SessionStream(secure.relay_url, session_id, credential=fresh_token, max_attempts=3)
    body = user_message("client outlives its tokens", LONG_BODY)
    generation_id = await accept(service, session_id, body)
    frames: list[dict[str, Any]] = []
    iterator = cast(AsyncGenerator[dict[str, Any], None], aiter(stream))
    async with asyncio.timeout(20), contextlib.aclosing(iterator):  # closed here, not at a later GC
        async for frame in iterator:
            frames.append(frame)
            if finished(generation_id)(frames):
                break
    assert len(minted) >= 2, "no token expired during the generation"
    assert stream.connections == len(minted)  # one connection per token, each resumed where the last ended
    assert_exact_once(frames, generation_id, body)
