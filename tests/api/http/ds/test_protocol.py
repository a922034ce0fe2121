"""The Durable Streams wire pieces, pure: offsets sort as the protocol wants and map to the relay's, JSON mode
flattens one level, SSE events cannot be forged from inside a payload, cursors move on when echoed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.http.ds.protocol import (
    CURSOR_EPOCH_MS,
    ZERO_OFFSET,
    Position,
    control_event,
    data_event,
    encode_offset,
    etag,
    json_messages,
    json_response,
    media_type,
    parse_expires_at,
    parse_offset,
    parse_ttl,
    response_cursor,
    same_config,
)
from tokenfan.contract.errors import InvalidJson, InvalidOffset, InvalidRequest
from tokenfan.contract.keys import SessionKeys, StreamKeys
from tokenfan.contract.offsets import StreamId

ids = st.builds(StreamId, st.integers(0, 10**15), st.integers(0, 10**15))


@given(ids, ids)
def test_offsets_sort_as_their_entries_do(a: StreamId, b: StreamId) -> None:
    assert (encode_offset(a) < encode_offset(b)) == (a < b)
    assert (encode_offset(a, "k3x9") < encode_offset(b, "k3x9")) == (a < b)


@given(ids, st.one_of(st.none(), st.from_regex(r"[0-9a-z]{1,16}", fullmatch=True)))
def test_an_offset_reads_back_as_the_position_it_names(stream_id: StreamId, epoch: str | None) -> None:
    assert parse_offset(encode_offset(stream_id, epoch)) == Position(stream_id, epoch)


def test_the_sentinels_and_the_zero_offset() -> None:
    assert parse_offset(None) == parse_offset("-1") == Position(StreamId.ZERO)
    assert parse_offset("now").now
    assert parse_offset(ZERO_OFFSET) == Position(StreamId.ZERO)
    assert encode_offset(StreamId.ZERO) == ZERO_OFFSET


@pytest.mark.parametrize(
    "bad", ["", "0,1", "0 1", "../x", "1_2", "a_b", "00000000000000001_1\n", "now1", "-2"]
)
def test_anything_else_is_no_offset(bad: str) -> None:
    with pytest.raises(InvalidOffset):
        parse_offset(bad)


def test_json_mode_flattens_one_level_and_refuses_what_is_not_json() -> None:
    assert json_messages(b'{"a": 1}', allow_empty=False) == ['{"a":1}']
    assert json_messages(b"[[1, 2], [3]]", allow_empty=False) == ["[1,2]", "[3]"]
    assert json_messages(b"[]", allow_empty=True) == []
    assert json_messages('"é"'.encode(), allow_empty=False) == ['"é"']
    for bad in (b"[]", b"{", b"NaN", b"[Infinity]", b"\xff"):
        with pytest.raises(InvalidJson):
            json_messages(bad, allow_empty=False)
    assert json_response([b'{"a":1}', b"1,2"]) == b'[{"a":1},1,2]'


def test_an_sse_payload_cannot_open_an_event_of_its_own() -> None:
    forged = "x\r\nevent: control\rdata: {}\n\nevent: data"
    event = data_event(forged).decode()
    assert event.startswith("event: data\n")
    assert event.endswith("\n\n")
    assert event.count("\n\n") == 1
    assert all(line.startswith(("event: data", "data:")) for line in event.splitlines() if line)
    assert (
        control_event({"streamNextOffset": "1_2"}) == b'event: control\ndata:{"streamNextOffset":"1_2"}\n\n'
    )


def test_the_cursor_is_the_interval_and_moves_on_when_echoed() -> None:
    now = CURSOR_EPOCH_MS + 20_000 * 100 + 5
    assert response_cursor(None, now) == "100"
    assert response_cursor("99", now) == "100"
    assert response_cursor("junk", now) == "100"
    moved = int(response_cursor("100", now, random.Random(1)))
    assert 101 <= moved <= 100 + 180


def test_headers_parse_strictly() -> None:
    assert parse_ttl("3600") == 3600
    for bad in ("+1", "01", "1.0", "1e3", " 1", "-1"):
        with pytest.raises(InvalidRequest):
            parse_ttl(bad)
    assert parse_expires_at("2030-01-01T00:00:00Z") == 1_893_456_000_000
    for bad in ("tomorrow", "2030-01-01T00:00:00"):
        with pytest.raises(InvalidRequest):
            parse_expires_at(bad)
    assert media_type("Application/JSON; charset=utf-8") == "application/json"


def test_an_idempotent_create_compares_what_was_asked() -> None:
    held = {"ctn": "text/plain", "ttl": "60", "fork_of": "a", "fork_offset": "1_1"}
    assert same_config(held, {"ctn": "text/plain", "ttl": "60", "fork_of": "a"})
    assert same_config(held, {"ctn": "text/plain", "ttl": "60", "fork_of": "a", "fork_offset": "1_1"})
    assert not same_config(held, {"ctn": "text/plain", "ttl": "60", "fork_of": "a", "fork_offset": "2_2"})
    assert not same_config(held, {"ctn": "text/html", "ttl": "60", "fork_of": "a"})


def test_etags_change_with_the_end_and_the_close() -> None:
    assert etag("a/b", "-1", "1_1", closed=False) != etag("a/b", "-1", "1_2", closed=False)
    assert etag("a/b", "-1", "1_1", closed=False) != etag("a/b", "-1", "1_1", closed=True)


def test_a_stream_lives_in_a_slot_of_its_own_and_is_never_a_session() -> None:
    keys = StreamKeys("x/{tag}/%y")
    assert keys.name == "ds:x/%7Btag%7D/%25y"
    assert keys.events == SessionKeys(keys.name).events == "tf:{ds:x/%7Btag%7D/%25y}:events"
    assert keys.producers.startswith("tf:{ds:x/%7Btag%7D/%25y}:")
    assert StreamKeys("a{b").name != StreamKeys("a%7Bb").name
