"""Who may do what under ``/ds/``, and the limits, on an API with keys (as production runs): API keys create,
append, read and delete; a session token reads its own session and nothing else; each limit answers its 4xx
(413 for a body, 429 ``too_many_streams`` for the streams of a key, 429 ``rate_limited`` for appends)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.support.requests import bearer, new_session_id
from tests.support.stack import RunningStack
from tokenfan.runtime.auth import TokenSigner, new_api_key, new_token_secret
from tokenfan.runtime.settings import Secret

OWNER = f"ds-{secrets.token_hex(4)}"  # its own name: its stream count starts at zero
KEY, OTHER_KEY = new_api_key(), new_api_key()
SECRET = new_token_secret()


@pytest.fixture(scope="module")
def keyed_api(single_stack: RunningStack) -> Iterator[str]:
    env = {
        "TOKENFAN_INSECURE_DEV_MODE": "false",
        "TOKENFAN_API_KEYS": f"{OWNER}:{KEY},{OWNER}-other:{OTHER_KEY}",
        "TOKENFAN_TOKEN_SECRETS": SECRET,
        "TOKENFAN_DS_MAX_STREAMS_PER_KEY": "2",
        "TOKENFAN_DS_APPENDS_PER_MINUTE": "6",  # one, then one every ten seconds
        "TOKENFAN_MAX_BODY_BYTES": "4096",
        "TOKENFAN_DS_LONG_POLL_SECONDS": "1",
    }
    front = RunningStack(
        redis_url=single_stack.redis_url, extra_env=env, simulator_url=single_stack.simulator_url
    )
    front.start(workers=0, relays=0)
    try:
        yield front.api_url
    finally:
        front.stop()


@pytest.fixture
async def client(keyed_api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=keyed_api, timeout=10) as http:
        yield http


def token_for(session_id: str) -> str:
    token, _ = TokenSigner(Secret(SECRET), 900).mint(session_id, subject="test")
    return token


async def test_a_session_token_reads_its_session_and_nothing_else(client: httpx.AsyncClient) -> None:
    session_id, elsewhere = new_session_id(), new_session_id()
    ds = f"/ds/sessions/{session_id}"
    appended = await client.post(ds, json={"type": "x.hello"}, headers=bearer(KEY))
    assert appended.status_code == 204
    reader = bearer(token_for(session_id))
    read = await client.get(ds, headers=reader)
    assert read.status_code == 200
    assert [event["type"] for event in read.json()] == ["x.hello"]
    assert (
        await client.get(ds, params={"token": token_for(session_id)})
    ).status_code == 200  # EventSource's way
    offset = read.headers["Stream-Next-Offset"]
    polled = await client.get(ds, params={"offset": offset, "live": "long-poll"}, headers=reader)
    assert polled.status_code == 204
    assert (await client.head(ds, headers=reader)).status_code == 200
    assert (await client.get(f"/ds/sessions/{elsewhere}", headers=reader)).status_code == 403
    assert (await client.post(ds, json={"type": "x.forged"}, headers=reader)).status_code == 403
    assert (await client.put("/ds/mine", headers=reader)).status_code == 403
    refused = await client.get(ds)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.get(ds, headers=bearer(new_api_key()))).status_code == 401


async def test_each_limit_answers_its_own_4xx(client: httpx.AsyncClient) -> None:
    owner, other = bearer(KEY), bearer(OTHER_KEY)
    first, second, third, gone = (f"/ds/limits/{secrets.token_hex(4)}" for _ in range(4))
    expired = {**owner, "Stream-Expires-At": "2001-01-01T00:00:00Z"}
    assert (await client.put(gone, headers=expired)).status_code == 201  # and expires at once
    assert (await client.put(first, headers=owner)).status_code == 201
    assert (await client.put(second, headers=owner)).status_code == 201  # the expired one counts no more
    refused = await client.put(third, headers=owner)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_streams"
    assert (await client.put(third, headers=other)).status_code == 201  # another key, its own count
    assert (await client.delete(first, headers=owner)).status_code == 204
    assert (await client.put(first, headers=owner)).status_code == 201  # a deleted stream counts no more
    large = await client.post(
        second, content=b"x" * 5000, headers={**owner, "content-type": "application/octet-stream"}
    )
    assert large.status_code == 413
    octets = {**other, "content-type": "application/octet-stream"}
    assert (await client.post(third, content=b"x", headers=octets)).status_code == 204
    too_soon = await client.post(third, content=b"x", headers=octets)  # ten seconds have not passed
    assert too_soon.status_code == 429
    assert too_soon.json()["error"]["code"] == "rate_limited"
    assert int(too_soon.headers["Retry-After"]) >= 1
