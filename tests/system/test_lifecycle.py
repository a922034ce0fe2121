"""A generation's life as users drive it: cancel, interrupt, metadata, and everything an upstream streams,
read back through the real openai client, the stream, and the snapshot endpoints."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.support.requests import SIMULATOR, accept, expected_text, user_message
from tests.support.stack import RunningStack
from tests.support.watchers import Watcher, finished
from tokenfan.cli.simulator import reply_chunks
from tokenfan.contract.events import GenerationStatus, text_sha256

pytestmark = pytest.mark.cluster_too


async def simulator_stats(stack: RunningStack) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=stack.simulator_url) as client:
        stats: dict[str, int] = (await client.get("/_sim/stats")).json()
        return stats


async def wait_for_delta(watcher: Watcher, generation_id: str) -> None:
    await watcher.receive_until(
        lambda frames: any(f["type"] == "delta" and f["generation_id"] == generation_id for f in frames)
    )


async def test_cancelling_a_running_generation_closes_the_upstream_and_frees_the_worker(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    before = await simulator_stats(stack)
    watcher = await Watcher(stack.relay_url, session_id).connect()
    long_one = await accept(api, session_id, user_message("a very long answer", {"tokens": 5000, "rate": 50}))
    after_it = user_message("the next prompt")
    next_one = await accept(api, session_id, after_it)
    await wait_for_delta(watcher, long_one)

    response = await api.post(f"/v1/generations/{long_one}/cancel")
    assert response.status_code == 202
    assert response.json() == {"generation_id": long_one, "status": "cancelling", "cancelled": True}
    await watcher.receive_until(finished(long_one, next_one))

    transcript = watcher.transcript()
    cancelled = transcript.generations[long_one]
    assert cancelled.status is GenerationStatus.CANCELLED
    assert expected_text(user_message("a very long answer", {"tokens": 5000, "rate": 50})).startswith(
        cancelled.text
    )
    ended = next(f for f in watcher.frames if f["type"] == "generation.cancelled")
    assert ended["reason"] == "requested"
    assert ended["usage"]["estimated"] is True
    assert transcript.generations[next_one].text == expected_text(after_it)  # the worker went on
    # The provider saw its request end: the simulator counted the client going away mid-stream.
    deadline = asyncio.get_running_loop().time() + 10
    while (stats := await simulator_stats(stack))["streams_disconnected"] <= before["streams_disconnected"]:
        assert asyncio.get_running_loop().time() < deadline, stats
    view = (await api.get(f"/v1/generations/{long_one}")).json()
    assert view["status"] == "cancelled"
    await watcher.close()


async def test_cancelling_a_queued_generation_ends_it_at_once_and_it_never_runs(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    running = await accept(api, session_id, user_message("first", {"tokens": 60, "rate": 200}))
    queued = await accept(api, session_id, user_message("second"))
    third_body = user_message("third")
    third = await accept(api, session_id, third_body)
    response = await api.post(f"/v1/generations/{queued}/cancel")
    assert response.status_code == 200
    assert response.json() == {"generation_id": queued, "status": "cancelled", "cancelled": True}
    await watcher.receive_until(finished(running, queued, third))
    events_of_queued = [f["type"] for f in watcher.frames if f["generation_id"] == queued]
    assert events_of_queued == ["generation.cancelled"]
    transcript = watcher.transcript()
    assert transcript.generations[running].status is GenerationStatus.COMPLETED
    assert transcript.generations[third].text == expected_text(third_body)
    await watcher.close()


async def test_cancelling_a_finished_generation_is_a_documented_no_op(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, user_message("quick"))
    await watcher.receive_until(finished(generation_id))
    response = await api.post(f"/v1/generations/{generation_id}/cancel")
    assert response.status_code == 200
    assert response.json() == {"generation_id": generation_id, "status": "completed", "cancelled": False}
    unknown = await api.post("/v1/generations/gen_01M85JSR67842W2YC56KNRN9TX/cancel")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "generation_not_found"
    await watcher.close()


async def test_interrupt_cancels_the_running_generation_and_runs_next(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    running = await accept(api, session_id, user_message("rambling", {"tokens": 5000, "rate": 50}))
    waiting = await accept(api, session_id, user_message("was waiting"))
    await wait_for_delta(watcher, running)
    urgent_body = {**user_message("stop, do this instead"), "policy": "interrupt"}
    response = await api.post(f"/v1/sessions/{session_id}/generations", json=urgent_body)
    assert response.status_code == 202
    assert response.json()["queue_position"] == 2
    urgent = response.json()["generation_id"]
    await watcher.receive_until(finished(running, urgent, waiting))
    ended = {
        f["generation_id"]: f for f in watcher.frames if f["type"].startswith("generation.") and "seq" in f
    }
    assert ended[running]["type"] == "generation.cancelled"
    assert ended[running]["reason"] == "interrupted"
    started = [f["generation_id"] for f in watcher.frames if f["type"] == "generation.started"]
    assert started == [running, urgent, waiting]
    assert watcher.transcript().generations[urgent].text == expected_text(urgent_body)
    await watcher.close()


async def test_metadata_is_stored_and_echoed_when_the_generation_starts(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    metadata = {"author": "ana", "thread": 7, "tags": ["draft", "ü"]}
    generation_id = await accept(api, session_id, {**user_message("tagged"), "metadata": metadata})
    await watcher.receive_until(finished(generation_id))
    started = next(f for f in watcher.frames if f["type"] == "generation.started")
    assert started["metadata"] == metadata
    too_big = {**user_message("huge"), "metadata": {"blob": "x" * 20_000}}
    response = await api.post(f"/v1/sessions/{session_id}/generations", json=too_big)
    assert response.status_code == 413
    await watcher.close()


def sim(content: str, **directive: Any) -> dict[str, Any]:
    return user_message(content, directive)


async def run_one(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str, body: dict[str, Any]
) -> Watcher:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    generation_id = await accept(api, session_id, body)
    await watcher.receive_until(finished(generation_id))
    await watcher.close()
    return watcher


async def test_reasoning_and_content_arrive_on_their_own_channels(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    thoughts = ["Let me ", "think: ", "two plus ", "two."]
    body = sim("what is 2+2", reasoning=thoughts, chunks=["It ", "is ", "4."])
    watcher = await run_one(stack, api, session_id, body)
    (generation,) = watcher.transcript().generations.values()  # checks the end's digests, reasoning's too
    assert generation.reasoning_text == "".join(thoughts)
    assert generation.text == "It is 4."
    completed = watcher.frames[-1]
    assert completed["reasoning_length"] == len("".join(thoughts))
    assert completed["reasoning_sha256"] == text_sha256("".join(thoughts))
    view = (await api.get(f"/v1/generations/{generation.generation_id}")).json()
    assert view["reasoning"] == "".join(thoughts)
    assert view["text"] == "It is 4."
    assert view["usage"]["completion_tokens"] > 0


async def test_parallel_tool_calls_reassemble_and_the_end_of_stream_proves_them(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    calls = [
        {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "unit": "C"})},
        {"name": "get_time", "arguments": json.dumps({"tz": "Asia/東京"}, ensure_ascii=False)},
    ]
    body = sim("weather and time", tool_calls=calls, parallel=True, chunks=["Checking."])
    watcher = await run_one(stack, api, session_id, body)
    (generation,) = watcher.transcript().generations.values()
    assembled = {call["name"]: call["arguments"] for call in generation.tool_calls.values()}
    assert assembled == {call["name"]: call["arguments"] for call in calls}
    assert all(call["id"] for call in generation.tool_calls.values())
    completed = watcher.frames[-1]
    assert completed["finish_reason"] == "tool_calls"
    digests = {d["name"]: d for d in completed["tool_calls"]}
    for call in calls:
        assert digests[call["name"]]["sha256"] == text_sha256(call["arguments"])
        assert digests[call["name"]]["length"] == len(call["arguments"])
    view = (await api.get(f"/v1/generations/{generation.generation_id}")).json()
    assert {c["name"]: c["arguments"] for c in view["tool_calls"]} == assembled


async def test_unicode_split_anywhere_survives_byte_for_byte(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    family = "👨\u200d👩\u200d👧\u200d👦"
    pieces = ["漢字と", "かな", family[:2], family[2:5], family[5:], " 🇨🇭", "é", "\u0301", " done"]
    watcher = await run_one(stack, api, session_id, sim("unicode", chunks=pieces))
    (generation,) = watcher.transcript().generations.values()  # also checks length and SHA-256
    assert generation.text == "".join(pieces)
    assert (await api.get(f"/v1/generations/{generation.generation_id}")).json()["text"] == "".join(pieces)


async def test_provider_quirks_do_not_change_the_text(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    body = sim("quirky", empty_deltas=True, extra_fields=True, usage="every", tokens=20)
    watcher = await run_one(stack, api, session_id, body)
    (generation,) = watcher.transcript().generations.values()
    assert generation.text == "".join(reply_chunks(body, SIMULATOR))
    assert generation.usage is not None
    assert generation.usage["completion_tokens"] == 20  # the last of the repeated reports wins


def well_formed(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD, as the worker takes it from its upstream."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


async def test_tool_calls_without_an_index_are_assembled_by_their_ids(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    calls = [
        {"name": "get_weather", "arguments": json.dumps({"city": "Zürich"}), "id": "call_w"},
        {"name": "get_time", "arguments": json.dumps({"tz": "UTC"}), "id": "call_t"},
    ]
    body = sim("no index", tool_calls=calls, tool_index=False, tool_chunk=4, chunks=["Checking."])
    watcher = await run_one(stack, api, session_id, body)
    (generation,) = watcher.transcript().generations.values()  # the end's digests prove each call
    assembled = [(call["id"], call["name"], call["arguments"]) for call in generation.tool_calls.values()]
    assert assembled == [(call["id"], call["name"], call["arguments"]) for call in calls]
    view = (await api.get(f"/v1/generations/{generation.generation_id}")).json()
    assert [(call["index"], call["name"]) for call in view["tool_calls"]] == [
        (0, "get_weather"),
        (1, "get_time"),
    ]


async def test_cumulative_text_comes_out_as_deltas(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    thoughts, pieces = ["Hmm, ", "let me ", "see."], ["The ", "answer ", "is ", "42", "."]
    body = sim("everything so far", reasoning=thoughts, chunks=pieces, cumulative=True)
    watcher = await run_one(stack, api, session_id, body)
    (generation,) = watcher.transcript().generations.values()
    assert (generation.text, generation.reasoning_text) == ("".join(pieces), "".join(thoughts))
    view = (await api.get(f"/v1/generations/{generation.generation_id}")).json()
    assert (view["text"], view["reasoning"]) == ("".join(pieces), "".join(thoughts))


async def test_lone_surrogates_from_the_upstream_become_replacement_characters(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    pieces = ["smile ", "\ud83d", "\ude00", " lone \udc00", " end"]  # an emoji's halves apart, one unpaired
    calls = [{"name": "note", "arguments": '{"mood": "\ud83d"}'}]
    body = sim("surrogates", chunks=pieces, reasoning=["why \udfff"], tool_calls=calls)
    watcher = await run_one(stack, api, session_id, body)
    (generation,) = watcher.transcript().generations.values()
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.text == "".join(well_formed(piece) for piece in pieces)
    assert generation.reasoning_text == "why \ufffd"
    assert [call["arguments"] for call in generation.tool_calls.values()] == ['{"mood": "\ufffd"}']
    # The worker goes on: a lone surrogate must not stop its writer (every generation would then hang).
    after = user_message("after the surrogates")
    again = await run_one(stack, api, session_id, after)
    assert again.transcript().generations[again.frames[-1]["generation_id"]].text == expected_text(after)
