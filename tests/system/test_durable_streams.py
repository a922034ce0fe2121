"""Sessions as Durable Streams (``/ds/sessions/{id}``), against the real processes, on one Redis and on a
cluster: a reader that long-polls, and one on SSE that drops and resumes by offset, get exactly what a relay
subscriber gets; apps' events appended while a generation streams reach every kind of subscriber in the
same place of the session's order, and every subscriber's checks (predecessor, seq) hold across them."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.delivery import assert_exact_delivery, transcript_of
from tests.support.durable import DsLongPoller, DsSseReader, Frames
from tests.support.requests import accept, expected_text, user_message
from tests.support.sse import SseWatcher
from tests.support.stack import RunningStack
from tests.support.watchers import Watcher, finished
from tokenfan.contract.events import APP_GENERATION_ID
from tokenfan.contract.keys import SessionKeys

pytestmark = pytest.mark.cluster_too


def _app_events(frames: Frames) -> list[dict[str, Any]]:
    return [frame for frame in frames if frame["type"].startswith("x.")]


def _with_app_events(generation_id: str, count: int) -> Any:
    ended = finished(generation_id)
    return lambda frames: ended(frames) and len(_app_events(frames)) >= count


def _positions(frames: Frames) -> list[tuple[str, str]]:
    """Where each non-delta event sits: its offset and type (deltas may be merged by the relay)."""
    return [(frame["offset"], frame["type"]) for frame in frames if frame["type"] != "delta"]


async def test_a_session_read_through_durable_streams_is_what_the_relay_sends(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    poller, reader = DsLongPoller(stack.api_url, session_id), DsSseReader(stack.api_url, session_id)
    body = user_message("follow me", {"tokens": 40, "rate": 400})
    try:
        generation_id = await accept(api, session_id, body)
        done = finished(generation_id)
        await asyncio.gather(
            watcher.receive_until(done),
            poller.follow_until(done),
            reader.follow_until(done, drop_after=3),  # leaves after 3 events, comes back from its offset
        )
    finally:
        await watcher.close()
    assert reader.connections >= 2
    for frames in (watcher.frames, poller.frames, reader.frames):
        await assert_exact_delivery(redis, session_id, frames)  # each event once, in order, none missing
        assert transcript_of(frames).generations[generation_id].text == expected_text(body)
        assert _positions(frames) == _positions(watcher.frames)
    # One Durable Streams message per stored event, and its offset is the relay's, re-written.
    assert [frame["offset"] for frame in poller.frames] == [frame["offset"] for frame in reader.frames]
    epoch, _, entry = poller.frames[-1]["offset"].partition(":")
    ms, _, seq = entry.partition("-")
    assert poller.offset == reader.offset == f"{int(ms):016d}_{int(seq):016d}_{epoch}"


async def test_app_events_appended_during_a_generation_reach_every_subscriber_in_order(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    watcher = await Watcher(stack.relay_url, session_id).connect()
    sse = await SseWatcher(stack.api_url, session_id).connect()
    poller, reader = DsLongPoller(stack.api_url, session_id), DsSseReader(stack.api_url, session_id)
    try:
        # The upstream stalls after 5 tokens: the app events land while the generation is running.
        generation_id = await accept(api, session_id, user_message("stall", {"stall_after": 5}))
        await watcher.receive_until(lambda frames: sum(frame["type"] == "delta" for frame in frames) >= 1)
        for note in (
            {"type": "x.note", "text": "one"},
            [{"type": "x.note", "text": "two"}, {"type": "x.tool"}],
        ):
            response = await api.post(f"/ds/sessions/{session_id}", json=note)
            assert response.status_code == 204, response.text
        assert (await api.post(f"/v1/generations/{generation_id}/cancel")).status_code in (200, 202)
        done = _with_app_events(generation_id, 3)
        await asyncio.gather(
            watcher.receive_until(done),
            sse.receive_until(done),
            poller.follow_until(done),
            reader.follow_until(done),
        )
    finally:
        await watcher.close()
        await sse.close()
    expected = [("x.note", 1, "one"), ("x.note", 2, "two"), ("x.tool", 3, None)]
    for frames in (watcher.frames, sse.frames, poller.frames, reader.frames):
        assert [(e["type"], e["seq"], e.get("text")) for e in _app_events(frames)] == expected
        assert {e["generation_id"] for e in _app_events(frames)} == {APP_GENERATION_ID}
        transcript_of(frames)  # predecessor order and every generation's seq hold across the app events
        await assert_exact_delivery(redis, session_id, frames)
        assert _positions(frames) == _positions(watcher.frames)
    types = [frame["type"] for frame in watcher.frames]
    assert types.index("x.note") > types.index("delta")  # between the generation's output...
    assert types.index("x.tool") < types.index("generation.cancelled")  # ...and its end


async def test_a_session_refuses_what_a_session_cannot_be(
    stack: RunningStack, api: httpx.AsyncClient, session_id: str
) -> None:
    ds = f"/ds/sessions/{session_id}"
    assert (await api.post(ds, json={"type": "x.first"})).status_code == 204
    head = await api.head(ds)
    offset = head.headers["Stream-Next-Offset"]
    assert head.headers["content-type"] == "application/json"
    assert (await api.get(ds, params={"offset": offset})).json() == []
    ms_seq, _, epoch = offset.rpartition("_")
    assert (await api.get(ds, params={"offset": f"{ms_seq}_{'z' * len(epoch)}"})).status_code == 410
    assert (
        await api.get(ds, params={"offset": ms_seq})
    ).status_code == 400  # a session's offsets carry the epoch
    assert (await api.post(ds, json={"type": "delta", "content": "forged"})).status_code == 400
    assert (await api.post(ds, json={"type": "x.a", "seq": 7})).status_code == 400
    assert (await api.post(ds, content=b"x", headers={"content-type": "text/plain"})).status_code == 409
    assert (await api.post(ds, headers={"Stream-Closed": "true"})).status_code == 409
    assert (await api.delete(ds)).status_code == 405
    assert (await api.put(ds, headers={"content-type": "application/json"})).status_code == 200


async def test_a_session_whose_history_was_trimmed_answers_410_gone(
    stack: RunningStack, api: httpx.AsyncClient, redis: Redis, session_id: str
) -> None:
    ds = f"/ds/sessions/{session_id}"
    appended = await api.post(ds, json=[{"type": "x.n", "i": i} for i in range(5)])
    assert appended.status_code == 204
    first = (await api.get(ds)).json()[0]["offset"]
    await redis.xtrim(SessionKeys(session_id).events, maxlen=2, approximate=False)
    epoch, _, entry = first.partition(":")
    ms, _, seq = entry.partition("-")
    position = f"{int(ms):016d}_{int(seq):016d}_{epoch}"
    for live in ({}, {"live": "long-poll"}):
        gone = await api.get(ds, params={"offset": position, **live})
        assert gone.status_code == 410
        assert gone.json()["error"]["code"] == "offset_gone"
    retained = (await api.get(ds)).json()  # from the start: what is retained
    assert [event["i"] for event in retained] == [3, 4]
