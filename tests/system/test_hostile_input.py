"""Hostile input: whatever a client sends, the API and the relay answer it as documented, never with a 5xx or
a crashed connection, and stay healthy and bounded afterwards.

* the API's own OpenAPI schema drives schemathesis: valid and invalid requests to every operation;
* hypothesis fuzzes every parser of ours not fuzzed elsewhere: multi-session client messages, the relay's
  query string, SSE positions, API keys, bearer headers and tokens;
* WebSocket clients misbehave: binary frames, malformed and oversized messages, subscribe floods, clients
  that vanish; the relay's memory is measured around it.

Everything runs against an API and a relay of this module's own (secure: an API key, token secrets), beside
the shared `stack`, whose Redis and workers they use. Their rate limits are lifted: fuzzing is fast on
purpose (tests/system/test_security.py covers the limits).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from schemathesis.checks import CHECKS as CHECKS_REGISTRY
from schemathesis.checks import load_all_checks
from schemathesis.config import PositiveDataAcceptanceConfig
from schemathesis.core.parameters import ParameterLocation
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection as SyncClientConnection
from websockets.sync.client import connect as connect_sync

from api.http.app import create_app
from tests.support.delivery import assert_exact_delivery, transcript_of
from tests.support.requests import accept, bearer, expected_text, new_session_id, user_message
from tests.support.stack import RunningStack, relay_process, rss_kib, start_frontends
from tests.support.waiting import Closer, wait_for_condition, wait_until
from tests.support.watchers import CredentialMultiWatcher, Watcher, finished, http_url, stream_url
from tokenfan.contract.errors import Unauthorized
from tokenfan.runtime.auth import (
    ApiKeys,
    Authenticator,
    TokenSigner,
    bearer_token,
    new_api_key,
    new_token_secret,
)
from tokenfan.runtime.settings import Secret, Settings, SettingsError

KEY = new_api_key()
SECRET = new_token_secret()
AUTH = bearer(KEY)
SSE_PATH = "/v1/sessions/{session_id}/events"
#: Close codes and error-frame codes a client's own mistakes may earn (docs/PROTOCOL.md).
CLIENT_ERROR_CODES = {4400, 4401, 4403, 4404, 4410}


@pytest.fixture(scope="module")
def hostile(stack: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(
        stack,
        {
            "TOKENFAN_INSECURE_DEV_MODE": "false",
            "TOKENFAN_API_KEYS": f"fuzz:{KEY}",
            "TOKENFAN_TOKEN_SECRETS": SECRET,
            "TOKENFAN_RATE_LIMIT_PER_MINUTE": "0",
            "TOKENFAN_RELAY_MAX_MESSAGES_PER_SECOND": "10000",
        },
    )
    try:
        yield front
    finally:
        front.stop()


@pytest.fixture(scope="module")
def history(hostile: RunningStack) -> str:
    """A session with one completed generation (its stream has events to replay)."""
    session_id = new_session_id()
    with httpx.Client(base_url=hostile.api_url, headers=AUTH, timeout=10) as client:
        response = client.post(f"/v1/sessions/{session_id}/generations", json=user_message("history"))
        assert response.status_code == 202, response.text
        generation = f"/v1/generations/{response.json()['generation_id']}"
        wait_until(
            lambda: client.get(generation).json()["status"] == "completed",
            "the history generation did not complete",
            timeout=20,
        )
    return session_id


# ------------------------------------------------------------------------------------------------ schemathesis

#: Every check schemathesis has (each one acts where it applies): no 5xx; a status, content type, headers
#: and body the schema documents; valid input accepted and invalid input refused, wherever it is (path,
#: query, headers, body); a request replayed without the credential refused.
load_all_checks()  # schemathesis registers its OpenAPI checks when first asked to: ask now
CHECKS = CHECKS_REGISTRY.get_all()


def request_headers(case: Any) -> dict[str, str]:
    """The case's headers with our credential, unless the case is about invalid headers (then as generated:
    schemathesis may have dropped or garbled ``Authorization`` on purpose). A valid ``Idempotency-Key`` is
    made the case's own: a key sent again with another body is a conflict of state (422
    ``idempotency_key_reused``), which no schema can state, and the cases reuse the few keys they draw."""
    headers = dict(case.headers or {})
    if case.meta.is_negative_at(ParameterLocation.HEADER):
        return headers
    if "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = uuid.uuid4().hex
    return {**headers, **AUTH}


def configured(schema: Any) -> Any:
    """Valid requests may still meet the state they name: an unknown generation or session (404, which the
    check expects), and a position the stream no longer holds, or never held in this incarnation (410,
    as 404 for a resume position). Both are answers about state, not about the request's form."""
    accepted = schema.config.checks.positive_data_acceptance
    schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
        expected_statuses=[*accepted.expected_statuses, "410"]
    )
    schema.config.max_stream_events = 1  # an accepted event stream never ends: its first event will do
    return schema


def the_api_schema() -> Any:
    """The API's own OpenAPI schema, as its app builds it: the same routes and models whatever the settings,
    so it is read here, without a server, for pytest to make one test of each operation."""
    app = create_app(Settings(insecure_dev_mode=True))
    return configured(schemathesis.openapi.from_dict(app.openapi()))


api_schema = the_api_schema()


def test_every_check_is_run() -> None:
    names = {check.__name__ for check in CHECKS}
    assert names >= {
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
        "use_after_free",
        "ensure_resource_availability",
        "ignored_auth",
    }


def test_the_schema_lists_every_operation(hostile: RunningStack) -> None:
    with httpx.Client(base_url=hostile.api_url, headers=AUTH, timeout=10) as client:
        served = client.get("/openapi.json").json()
    assert served == schemathesis.openapi.from_dict(served).raw_schema
    assert served["paths"] == api_schema.raw_schema["paths"]  # the schema under test is the one served
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("POST", "/v1/sessions/{session_id}/generations"),
        ("POST", "/v1/sessions/{session_id}/tokens"),
        ("GET", "/v1/sessions/{session_id}"),
        ("GET", SSE_PATH),
        ("GET", "/v1/generations/{generation_id}"),
        ("POST", "/v1/generations/{generation_id}/cancel"),
    }


@api_schema.parametrize()  # type: ignore[untyped-decorator]  # schemathesis's decorator is not typed
@settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_generated_requests_as_its_schema_says(
    case: Any, hostile: RunningStack, history: str
) -> None:
    """Each operation, through every phase schemathesis has: the schema's examples, its coverage cases (each
    parameter and member at its bounds, of the wrong type, missing, and the method not allowed) and fuzzed
    requests; valid and invalid data alike, every check on every answer."""
    headers = request_headers(case)
    if case.path == SSE_PATH and not case.meta.is_negative_at(ParameterLocation.PATH):
        # A session with history: an accepted stream's first event comes at once (a new session's would
        # only come with its first generation, so each such case would wait for its read timeout).
        case.path_parameters = {**(case.path_parameters or {}), "session_id": history}
    # An event stream is read up to its first event (`configured`), then checked as any other answer.
    response = case.call(base_url=hostile.api_url, headers=headers, timeout=10)
    case.validate_response(response, checks=CHECKS, headers=headers)


# ------------------------------------------------------------------------------------------------ relay fuzz

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60)
HISTORY = "<the history session>"
session_ids = st.sampled_from([HISTORY, "s", "-leading-dash", "a" * 129, ""]) | text | json_values
subscription_requests = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe"]) | json_values, "session_id": session_ids},
    optional={"after": text | json_values, "token": text | json_values, "extra": json_values},
)


@st.composite
def client_messages(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.sampled_from(["request", "json", "text", "binary"]))
    if kind == "request":
        return json.dumps(draw(subscription_requests))
    if kind == "json":
        return json.dumps(draw(json_values))
    if kind == "text":
        return draw(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
    return draw(st.binary(max_size=200))


def next_control(websocket: SyncClientConnection) -> dict[str, Any]:
    """The next message without an offset (event frames of a subscribed session may come first)."""
    while True:
        message = json.loads(websocket.recv(timeout=10))
        if "offset" not in message:
            return dict(message)


@settings(max_examples=120, deadline=None, database=None)
@given(batch=st.lists(client_messages(), min_size=1, max_size=5))
def test_any_client_message_on_v1_stream_is_answered_and_the_connection_survives(
    hostile: RunningStack, history: str, batch: list[str | bytes]
) -> None:
    with connect_sync(
        f"{hostile.relay_url}/v1/stream", additional_headers=AUTH, open_timeout=10
    ) as websocket:
        for message in batch:
            if isinstance(message, str):
                message = message.replace(json.dumps(HISTORY)[1:-1], history)
            websocket.send(message)
            answer = next_control(websocket)  # a ConnectionClosed here is the failure looked for
            assert answer["type"] in ("subscribed", "unsubscribed", "error"), answer
            if answer["type"] == "error":
                assert answer["code"] in CLIENT_ERROR_CODES, answer
                assert isinstance(answer["reason"], str)


def close_code_of(url: str) -> int:
    with (
        connect_sync(url, additional_headers=AUTH, open_timeout=10) as websocket,
        pytest.raises(ConnectionClosed) as closed,  # not a frame: the subscription must be refused
    ):
        websocket.recv(timeout=10)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code


offset_shaped = st.builds(
    "{}:{}-{}".format,
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12),
    st.integers(min_value=0, max_value=2**70),
    st.integers(min_value=0, max_value=2**70),
)
after_values = (
    text | offset_shaped | st.sampled_from(["", "0-0", ":", "x:0-0", "x:-1-0", "x:1-", "$", "+", "-"])
)


@settings(max_examples=80, deadline=None, database=None)
@given(after=after_values)
def test_any_after_value_is_refused_with_a_client_close_code(
    hostile: RunningStack, history: str, after: str
) -> None:
    code = close_code_of(f"{stream_url(hostile.relay_url, history)}?{urlencode({'after': after})}")
    assert code in (4400, 4404, 4410)


@settings(max_examples=50, deadline=None, database=None)
@given(
    query=st.lists(
        st.tuples(st.sampled_from(["after", "token", "After", "x", "after[]"]) | text, after_values),
        min_size=1,
        max_size=3,
        # Only `token`s: the header's API key wins over a query token, so such a request is rightly served.
    ).filter(lambda pairs: not all(key == "token" for key, _ in pairs))
)
def test_any_query_string_is_refused_with_a_client_close_code(
    hostile: RunningStack, history: str, query: list[tuple[str, str]]
) -> None:
    code = close_code_of(f"{stream_url(hostile.relay_url, history)}?{urlencode(query)}")
    assert code in CLIENT_ERROR_CODES


def test_a_refusal_whose_reason_echoes_non_ascii_input_still_closes_with_4400(
    hostile: RunningStack, history: str
) -> None:
    """A close reason holds at most 123 bytes of UTF-8; the reason for an unknown query parameter names it."""
    for name in ("é" * 100, "語" * 60, "x" * 200):
        code = close_code_of(f"{stream_url(hostile.relay_url, history)}?{urlencode({name: '1'})}")
        assert code == 4400, f"closed with {code} for an unknown parameter of {len(name)} {name[0]!r}s"


# ------------------------------------------------------------------------------------------------ SSE positions

printable = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=90)


@settings(max_examples=30, deadline=None, database=None)
@given(where=st.sampled_from(["Last-Event-ID", "after"]), position=printable | offset_shaped)
def test_any_sse_position_is_a_4xx_never_a_5xx(
    hostile: RunningStack, history: str, where: str, position: str
) -> None:
    options: dict[str, Any] = (
        {"headers": {"Last-Event-ID": position}}
        if where == "Last-Event-ID"
        else {"params": {"after": position}}
    )
    with (
        httpx.Client(base_url=hostile.api_url, headers=AUTH, timeout=10) as client,
        client.stream("GET", f"/v1/sessions/{history}/events", **options) as response,
    ):
        response.read()  # an empty position too: the relay refuses `after=` as well
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["status"] == response.status_code


# ------------------------------------------------------------------------------------------------ credentials


API_KEYS_ERROR = re.compile(
    r"TOKENFAN_API_KEYS entry \d+( must look like 'name:key'| has a malformed sha256 digest"
    r"|: a sha256 digest has 64 hex digits|: keys need at least 16 characters)"
)


@settings(max_examples=150, deadline=None)
@given(config=st.text(max_size=120) | st.lists(text, max_size=4).map(",".join))
def test_api_keys_parse_or_raise_settings_error_without_echoing_them(config: str) -> None:
    try:
        keys = ApiKeys.parse(Secret(config))
    except SettingsError as error:
        message = str(error)
    else:
        message = ""
    if message:
        assert API_KEYS_ERROR.fullmatch(message), message  # a fixed sentence: no key is ever echoed
        return
    assert bool(keys) == bool(config.strip())
    for entry in config.split(",") if config.strip() else []:
        _, _, value = entry.strip().partition(":")
        if not value.startswith("sha256:"):
            assert keys.identify(value) is not None


key_characters = st.characters(
    categories=("Ll", "Lu", "Nd"), include_characters="-_.~+/=", max_codepoint=0x7F
)


@settings(max_examples=100, deadline=None)
@given(
    entries=st.lists(
        st.tuples(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
            st.text(alphabet=key_characters, min_size=16, max_size=40),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    ),
    stranger=st.text(max_size=60),
)
def test_configured_keys_identify_their_name_and_nothing_else(
    entries: list[tuple[str, str, bool]], stranger: str
) -> None:
    config = ",".join(
        f"{name}:sha256:{hashlib.sha256(key.encode()).hexdigest()}" if digest else f"{name}:{key}"
        for name, key, digest in entries
    )
    keys = ApiKeys.parse(Secret(config))
    for _, key, _ in entries:
        assert keys.identify(key) == next(name for name, k, _ in entries if k == key)
    if stranger not in {key for _, key, _ in entries}:
        assert keys.identify(stranger) is None


@given(header=st.text(max_size=80) | st.none())
def test_bearer_token_extracts_a_credential_or_nothing(header: str | None) -> None:
    credential = bearer_token(header)
    if credential is not None:
        assert credential == credential.strip()
        assert credential
        assert header is not None
        assert header.strip().lower().startswith("bearer")


def _b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


claims = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.sampled_from(["tokenfan", "other"]) | json_values,
        "sub": st.sampled_from(["s1"]) | json_values,
        "scope": st.sampled_from(["subscribe", "admin"]) | json_values,
        "exp": st.sampled_from([int(time.time()) + 3600, 0]) | json_values,
        "iat": json_values,
        "nbf": json_values,
        "by": json_values,
    },
)
headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "HS512", "none", "None", "RS256", "ES256"]) | json_values},
    optional={"typ": json_values, "kid": json_values, "b64": st.booleans(), "crit": json_values},
)


@st.composite
def tokens(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any] | Any, str]:
    """A JWT-shaped string: any header, any payload, and a correct, absent or random HS256 signature."""
    header = draw(headers)
    payload = draw(claims | json_values)
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = draw(st.sampled_from(["correct", "empty", "random"]))
    if signature == "correct":
        mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(mac)}", header, payload, signature
    if signature == "empty":
        return f"{signing_input}.", header, payload, signature
    return f"{signing_input}.{_b64(draw(st.binary(min_size=1, max_size=64)))}", header, payload, signature


@settings(max_examples=150, deadline=None)
@given(token=tokens())
def test_token_verification_accepts_only_what_we_signed_for_subscribing(
    token: tuple[str, dict[str, Any], Any, str],
) -> None:
    text_, header, payload, signature = token
    try:
        principal = TokenSigner(Secret(SECRET), 900).verify(text_)
    except Unauthorized:
        return
    assert signature == "correct"
    assert header["alg"] == "HS256"
    assert isinstance(payload, dict)
    assert payload["iss"] == "tokenfan"
    assert payload["scope"] == "subscribe"
    assert principal.session_id == payload["sub"]
    assert isinstance(principal.session_id, str)


@settings(max_examples=300, deadline=None)
@given(credential=st.text(max_size=200) | st.sampled_from(["a.b.c", "..", KEY + " ", " " + KEY]))
def test_any_presented_credential_is_a_principal_or_unauthorized(credential: str) -> None:
    authenticator = Authenticator(
        ApiKeys.parse(Secret(f"fuzz:{KEY}")), TokenSigner(Secret(SECRET), 900), insecure_dev_mode=False
    )
    try:
        principal = authenticator.authenticate(credential)
    except Unauthorized:
        return
    assert credential == KEY
    assert principal.is_service


# ------------------------------------------------------------------------------------------------ WebSocket clients


async def test_binary_and_malformed_messages_on_v1_stream_are_answered(
    hostile: RunningStack, opened: Closer
) -> None:
    multi = await opened(CredentialMultiWatcher(hostile.relay_url)).connect_with(header=KEY)
    subscribe = json.dumps({"type": "subscribe", "session_id": new_session_id()})
    for message in (
        b"\x00\xff\xfe",
        subscribe.encode(),  # valid JSON, but in a binary frame
        "not json",
        "",
        "null",
        "[]",
        "42",
        '"subscribe"',
        '{"type": "subscribe"}',
        '{"type": "subscribe", "session_id": 7}',
        '{"type": "subscribe", "session_id": "s", "after": 7}',
        '{"type": "subscribe", "session_id": "s", "token": 7}',
        '{"type": "watch", "session_id": "s"}',
        "\ufeff" + subscribe,
    ):
        answer = await multi.request(message)
        assert (answer["type"], answer["code"]) == ("error", 4400), (message, answer)
    answer = await multi.request(subscribe)
    assert answer["type"] == "subscribed"  # the connection is as good as new


async def test_deeply_nested_json_is_answered_as_malformed_not_with_an_internal_error(
    hostile: RunningStack, opened: Closer
) -> None:
    multi = await opened(CredentialMultiWatcher(hostile.relay_url)).connect_with(header=KEY)
    for message in ("[" * 5000, '{"type": "subscribe", "session_id": ' + "[" * 5000):
        try:
            answer = await multi.request(message)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            raise AssertionError(f"the relay closed the connection ({code}) on {message[:40]!r}…") from None
        assert (answer["type"], answer["code"]) == ("error", 4400)


async def test_a_single_session_stream_answers_what_it_cannot_take_with_4400_and_goes_on(
    hostile: RunningStack, opened: Closer
) -> None:
    session_id = new_session_id()
    watcher = await opened(Watcher(hostile.relay_url, session_id)).connect(credential=KEY)
    assert watcher.connection is not None
    messages: list[str | bytes] = [
        b"\x00\xff",
        json.dumps({"type": "refresh", "token": KEY}).encode(),  # a known message, in a binary frame
        "not json",
        "",
        "[" * 5000,
        "null",
        json.dumps({"type": "unsubscribe", "session_id": session_id}),
        json.dumps({"type": "subscribe", "session_id": new_session_id()}),
        json.dumps({"type": "watch"}),
        json.dumps({"type": "refresh"}),
        "x" * 16_384,
    ]
    for sent, message in enumerate(messages, start=1):
        await watcher.connection.send(message)
        await watcher.receive_until(lambda frames, sent=sent: len(frames) == sent)  # type: ignore[misc]
        answer = watcher.frames[-1]
        assert (answer["type"], answer["code"]) == ("error", 4400), (message[:40], answer)
        assert isinstance(answer["reason"], str)
        assert "offset" not in answer  # a control frame, not an event
    body = user_message("after the noise")
    async with httpx.AsyncClient(base_url=hostile.api_url, headers=AUTH, timeout=10) as api:
        generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    events = [frame for frame in watcher.frames if "offset" in frame]
    assert transcript_of(events).generations[generation_id].text == expected_text(body)


@pytest.mark.parametrize("path", ["/v1/stream", "/v1/sessions/{session_id}/stream"])
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_an_oversized_message_closes_with_1009(hostile: RunningStack, path: str, kind: str) -> None:
    url = hostile.relay_url + path.format(session_id=new_session_id())
    payload: str | bytes = "x" * 16_385 if kind == "text" else b"\x00" * 16_385
    async with connect(url, additional_headers=AUTH) as websocket:
        await websocket.send(payload)
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.recv()  # neither path answers the message: the next thing is the close
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def relay_stats(stack: RunningStack) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=http_url(stack.relay_url), headers=AUTH, timeout=10) as relay:
        stats: dict[str, int] = (await relay.get("/stats")).json()
        return stats


async def subscribe_flood(relay_url: str, session_id: str, pairs: int) -> list[dict[str, Any]]:
    """Subscribe and unsubscribe one session `pairs` times, pipelined; returns every message received."""
    received: list[dict[str, Any]] = []
    async with connect(f"{relay_url}/v1/stream", additional_headers=AUTH, max_size=None) as websocket:

        async def send_all() -> None:
            for _ in range(pairs):
                await websocket.send(json.dumps({"type": "subscribe", "session_id": session_id}))
                await websocket.send(json.dumps({"type": "unsubscribe", "session_id": session_id}))

        sender = asyncio.create_task(send_all())
        try:
            async with asyncio.timeout(40):
                while sum("offset" not in m for m in received) < 2 * pairs:
                    received.append(json.loads(await websocket.recv()))
        finally:
            await sender
    return received


def assert_nothing_after_unsubscribed(received: list[dict[str, Any]], pairs: int) -> None:
    controls = [m["type"] for m in received if "offset" not in m]
    assert controls == ["subscribed", "unsubscribed"] * pairs
    subscribed = False
    for message in received:
        if "offset" not in message:
            subscribed = message["type"] == "subscribed"
        else:
            assert subscribed, "an event frame arrived after 'unsubscribed'"


async def test_floods_and_vanishing_clients_leave_the_relay_healthy_and_bounded(
    hostile: RunningStack, history: str, redis: Redis
) -> None:
    relay_pid = relay_process(hostile).pid
    assert_nothing_after_unsubscribed(await subscribe_flood(hostile.relay_url, history, 200), 200)  # warm-up
    before = rss_kib(relay_pid)

    assert_nothing_after_unsubscribed(await subscribe_flood(hostile.relay_url, history, 1000), 1000)

    # Clients that subscribe, then vanish without a closing handshake.
    for _ in range(4):
        sockets = [
            await connect(f"{hostile.relay_url}/v1/stream", additional_headers=AUTH) for _ in range(50)
        ]
        for websocket in sockets:
            await websocket.send(json.dumps({"type": "subscribe", "session_id": history}))
        for websocket in sockets:
            while "offset" in json.loads(await websocket.recv()):
                pass
        for websocket in sockets:
            websocket.transport.abort()
            await websocket.wait_closed()

    async def forgotten() -> bool:
        stats = await relay_stats(hostile)
        return stats["connections"] == 0 and stats["subscribers"] == 0

    await wait_for_condition(forgotten, timeout=20)
    after = rss_kib(relay_pid)
    assert after - before < 48 * 1024, f"the relay grew from {before} KiB to {after} KiB"

    # Still healthy: it answers, and a new subscriber gets a new generation exactly.
    async with httpx.AsyncClient(base_url=http_url(hostile.relay_url), timeout=10) as relay:
        assert (await relay.get("/healthz")).status_code == 200
    session_id = new_session_id()
    watcher = await Watcher(hostile.relay_url, session_id).connect(credential=KEY)
    try:
        body = user_message("after the flood")
        async with httpx.AsyncClient(base_url=hostile.api_url, headers=AUTH, timeout=10) as api:
            generation_id = await accept(api, session_id, body)
        await watcher.receive_until(finished(generation_id))
    finally:
        await watcher.close()
    assert watcher.transcript().generations[generation_id].text == expected_text(body)
    await assert_exact_delivery(redis, session_id, watcher.frames)
