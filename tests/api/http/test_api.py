"""The request API over real HTTP: what it accepts, what it answers, and that bad input touches nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.requests import accept, expected_text, new_session_id, user_message
from tests.support.stack import RunningStack
from tests.support.watchers import Watcher, finished
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.contract.ids import GENERATION_ID_PATTERN
from tokenfan.contract.keys import ARQ_QUEUE


async def session_keys(redis: Redis, session_id: str) -> list[bytes]:
    return sorted(await redis.keys(f"tf:{{{session_id}}}:*"))


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["status"] == status
    assert error["message"]
    return error


async def test_an_accepted_generation_answers_202_with_its_id_and_links(
    api: httpx.AsyncClient, session_id: str
) -> None:
    response = await api.post(f"/v1/sessions/{session_id}/generations", json=user_message("hello"))
    assert response.status_code == 202
    body = response.json()
    assert re.fullmatch(GENERATION_ID_PATTERN, body["generation_id"])
    assert body["session_id"] == session_id
    assert body["status"] == "queued"
    assert body["queue_position"] == 1
    assert body["links"]["self"] == f"/v1/generations/{body['generation_id']}"
    assert body["links"]["events"] == f"/v1/sessions/{session_id}/events"
    assert response.headers["location"] == body["links"]["self"]


async def test_a_generation_reads_back_running_then_completed_with_its_text(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    body = user_message("read me back", {"tokens": 40, "rate": 200})
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(lambda frames: any(frame["type"] == "delta" for frame in frames))
    running = (await api.get(f"/v1/generations/{generation_id}")).json()
    assert running["status"] == "running"
    assert expected_text(body).startswith(running["text"])
    await watcher.receive_until(finished(generation_id))
    done = (await api.get(f"/v1/generations/{generation_id}")).json()
    assert done["status"] == "completed"
    assert done["text"] == expected_text(body)
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 40
    assert done["last_offset"] == watcher.frames[-1]["offset"]
    assert done["first_offset"] == watcher.frames[0]["offset"]
    await watcher.close()


async def test_a_session_snapshot_is_consistent_with_its_offset(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    bodies = [user_message("one"), user_message("two")]
    watcher = await Watcher(stack.relay_url, session_id).connect()
    ids = [await accept(api, session_id, body) for body in bodies]
    await watcher.receive_until(finished(*ids))
    snapshot = (await api.get(f"/v1/sessions/{session_id}")).json()
    assert snapshot["offset"] == watcher.frames[-1]["offset"]
    assert [g["generation_id"] for g in snapshot["generations"]] == ids
    assert [g["text"] for g in snapshot["generations"]] == [expected_text(body) for body in bodies]
    await watcher.close()


async def test_an_idempotency_key_makes_a_retried_post_return_the_first_generation(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    url = f"/v1/sessions/{session_id}/generations"
    first = await api.post(url, json=user_message("once"), headers=headers)
    again = await api.post(url, json=user_message("once"), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["generation_id"] == first.json()["generation_id"]
    assert again.headers["idempotent-replayed"] == "true"
    watcher = await Watcher(stack.relay_url, session_id).connect()
    await watcher.receive_until(finished(first.json()["generation_id"]))
    snapshot = (await api.get(f"/v1/sessions/{session_id}")).json()
    assert len(snapshot["generations"]) == 1
    await watcher.close()


async def test_an_idempotency_key_reused_with_another_request_is_422_and_changes_nothing(
    api: httpx.AsyncClient, session_id: str
) -> None:
    url, headers = f"/v1/sessions/{session_id}/generations", {"Idempotency-Key": "order-43"}
    first = await api.post(url, json=user_message("once"), headers=headers)
    assert first.status_code == 202
    for other in (user_message("twice"), {**user_message("once"), "policy": "reject"}):
        error = assert_error(await api.post(url, json=other, headers=headers), 422, "idempotency_key_reused")
        assert "Idempotency-Key" in error["message"]
    again = await api.post(url, json=user_message("once"), headers=headers)
    assert (again.status_code, again.json()["generation_id"]) == (202, first.json()["generation_id"])
    snapshot = (await api.get(f"/v1/sessions/{session_id}")).json()
    assert [g["generation_id"] for g in snapshot["generations"]] == [first.json()["generation_id"]]


@pytest.fixture(scope="module")
def idle(stack: RunningStack) -> Iterator[tuple[RunningStack, str]]:
    """An API on a Redis of its own that no worker polls (every job it enqueues stays in the queue), allowing
    one generation a minute; and that Redis's URL."""
    with EmbeddedRedis() as server:
        front = RunningStack(
            redis_url=server.url,
            simulator_url=stack.simulator_url,
            extra_env={"TOKENFAN_RATE_LIMIT_PER_MINUTE": "1"},
        )
        try:
            yield front.start(workers=0), server.url
        finally:
            front.stop()


async def test_replayed_and_refused_requests_take_no_allowance_and_enqueue_no_job(
    idle: tuple[RunningStack, str], session_id: str
) -> None:
    front, redis_url = idle
    url, headers = f"/v1/sessions/{session_id}/generations", {"Idempotency-Key": "order-44"}
    async with httpx.AsyncClient(base_url=front.api_url, timeout=10) as client:
        # A refused request takes nothing either: the minute's one generation is still there after it.
        too_many = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 513}
        assert_error(await client.post(url, json=too_many), 413, "payload_too_large")
        first = await client.post(url, json=user_message("once"), headers=headers)
        assert first.status_code == 202, first.text
        for _ in range(3):
            again = await client.post(url, json=user_message("once"), headers=headers)
            assert again.status_code == 202, again.text
            assert again.json()["generation_id"] == first.json()["generation_id"]
            assert again.headers["idempotent-replayed"] == "true"
        # The allowance is real: the first request took it, and a new request is refused.
        assert_error(await client.post(url, json=user_message("new")), 429, "rate_limited")
    async with Redis.from_url(redis_url) as redis:
        jobs = [job.decode() for job in await redis.zrange(ARQ_QUEUE, 0, -1)]
    assert jobs == [first.json()["generation_id"]]


async def test_policy_reject_refuses_a_busy_session_with_409_and_changes_nothing(
    api: httpx.AsyncClient, session_id: str
) -> None:
    await accept(api, session_id, user_message("long", {"tokens": 200, "rate": 100}))
    response = await api.post(
        f"/v1/sessions/{session_id}/generations", json={**user_message("me next"), "policy": "reject"}
    )
    assert_error(response, 409, "conflict")
    snapshot = (await api.get(f"/v1/sessions/{session_id}")).json()
    assert len(snapshot["generations"]) == 1


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, ["body", "model"]),
        ({"model": "m", "messages": []}, ["body", "messages"]),
        ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, ["body", "messages", "0", "role"]),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temprature": 1},
            ["body", "temprature"],
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
            ["body", "temperature"],
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, ["body", "n"]),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "policy": "jump"},
            ["body", "policy"],
        ),
        ({"model": "", "messages": [{"role": "user", "content": "hi"}]}, ["body", "model"]),
        (["not", "an", "object"], ["body"]),
        # Strict types, as the schema states them: nothing is coerced into what was not sent.
        ({**user_message("hi"), "parallel_tool_calls": 1}, ["body", "parallel_tool_calls"]),
        ({**user_message("hi"), "temperature": "1"}, ["body", "temperature"]),
        ({**user_message("hi"), "temperature": True}, ["body", "temperature"]),
        ({**user_message("hi"), "max_tokens": 10.5}, ["body", "max_tokens"]),
        ({**user_message("hi"), "max_tokens": "10"}, ["body", "max_tokens"]),
        ({**user_message("hi"), "n": True}, ["body", "n"]),
        ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, ["body", "model"]),
        (
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            ["body", "messages", "0", "content", "str"],
        ),
    ],
)
async def test_an_invalid_body_is_422_with_where_it_failed_and_touches_nothing(
    api: httpx.AsyncClient, redis: Redis, body: Any, location: list[str]
) -> None:
    session_id = new_session_id()
    response = await api.post(f"/v1/sessions/{session_id}/generations", json=body)
    error = assert_error(response, 422, "validation_error")
    assert any(detail["location"] == location for detail in error["details"]), error["details"]
    assert await session_keys(redis, session_id) == []


async def test_sampling_extensions_pass_through_and_what_cannot_be_carried_is_refused_saying_why(
    api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    url = f"/v1/sessions/{session_id}/generations"
    extensions = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}
    accepted = await api.post(url, json={**user_message("sample me"), **extensions})
    assert accepted.status_code == 202, accepted.text
    for name, value in (("logprobs", True), ("stream", True), ("functions", [])):
        error = assert_error(
            await api.post(url, json={**user_message("x"), name: value}), 422, "validation_error"
        )
        (detail,) = error["details"]
        assert detail["location"] == ["body", name]
        assert detail["message"].startswith(f"tokenfan cannot carry {name!r}")
    error = assert_error(
        await api.post(url, json={**user_message("x"), "tempreature": 1}), 422, "validation_error"
    )
    assert "'tempreature' is not a member tokenfan knows" in error["details"][0]["message"]


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "m", "messages": [{"role": "user", "content": "half an emoji \\ud83d"}]}',
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": {"\\udfff": 1}}',
        '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
    ],
    ids=["content", "metadata-key", "content-part"],
)
async def test_text_that_is_not_valid_unicode_is_422_and_touches_nothing(
    api: httpx.AsyncClient, redis: Redis, session_id: str, raw: str
) -> None:
    """JSON may escape a lone surrogate; no UTF-8 encoder takes the text it decodes to, Redis's neither."""
    response = await api.post(
        f"/v1/sessions/{session_id}/generations", content=raw, headers={"content-type": "application/json"}
    )
    error = assert_error(response, 422, "validation_error")
    assert "surrogate" in error["details"][0]["message"]
    assert await session_keys(redis, session_id) == []
    assert (await api.get("/healthz")).status_code == 200  # and the connection was answered, not dropped


async def test_a_whole_number_is_an_integer_however_it_is_written(
    api: httpx.AsyncClient, session_id: str
) -> None:
    """JSON has numbers: 64.0 is the integer 64, as the schema's "integer" says; strictness refuses only
    what is not one (64.5, "64", true)."""
    response = await api.post(
        f"/v1/sessions/{session_id}/generations", json={**user_message("hi"), "max_tokens": 64.0}
    )
    assert response.status_code == 202, response.text


async def test_malformed_json_is_400(api: httpx.AsyncClient, redis: Redis, session_id: str) -> None:
    response = await api.post(
        f"/v1/sessions/{session_id}/generations",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "invalid_json")
    assert await session_keys(redis, session_id) == []


async def test_an_oversized_body_is_413_whether_declared_or_streamed(
    api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    url = f"/v1/sessions/{session_id}/generations"
    huge = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * 1_100_000 + b'"}]}'
    declared = await api.post(url, content=huge, headers={"content-type": "application/json"})
    assert_error(declared, 413, "payload_too_large")

    async def chunks() -> Any:
        for start in range(0, len(huge), 65_536):
            yield huge[start : start + 65_536]

    streamed = await api.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert_error(streamed, 413, "payload_too_large")
    assert await session_keys(redis, session_id) == []


async def test_too_many_messages_is_413(api: httpx.AsyncClient, redis: Redis, session_id: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 513}
    assert_error(
        await api.post(f"/v1/sessions/{session_id}/generations", json=body), 413, "payload_too_large"
    )
    assert await session_keys(redis, session_id) == []


@pytest.mark.parametrize(
    "session_id", ["a" * 129, "-leading-dash", "has.%7Bbrace%7D", "sp%20ace", "%C3%A9t%C3%A9"]
)
async def test_a_malformed_session_id_is_400(api: httpx.AsyncClient, session_id: str) -> None:
    response = await api.post(f"/v1/sessions/{session_id}/generations", json=user_message("hi"))
    assert_error(response, 400, "invalid_session_id")
    assert_error(await api.get(f"/v1/sessions/{session_id}"), 400, "invalid_session_id")


async def test_unknown_and_malformed_generation_ids(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/v1/generations/gen_01M85JSR67842W2YC56KNRN9TX"), 404, "generation_not_found")
    assert_error(await api.get("/v1/generations/nope"), 400, "invalid_generation_id")


async def test_an_unknown_session_is_404(api: httpx.AsyncClient, session_id: str) -> None:
    assert_error(await api.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")


async def test_unknown_routes_and_methods_answer_in_the_same_error_format(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/v1/nowhere"), 404, "not_found")
    assert_error(await api.delete("/v1/sessions/s1/generations"), 405, "method_not_allowed")


async def test_a_malformed_idempotency_key_is_422(api: httpx.AsyncClient, session_id: str) -> None:
    response = await api.post(
        f"/v1/sessions/{session_id}/generations",
        json=user_message("hi"),
        headers={"Idempotency-Key": "a b{c}"},
    )
    assert_error(response, 422, "validation_error")


async def test_health_readiness_and_the_openapi_schema(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ready"}
    schema = (await api.get("/openapi.json")).json()
    assert "/v1/sessions/{session_id}/generations" in schema["paths"]
    assert "/v1/generations/{generation_id}" in schema["paths"]
