"""Event bodies and frames: bodies are compact UTF-8 JSON with their members in the documented order, and
a frame is its body with the offset spliced in as the first member.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfan.contract.events import (
    TERMINAL_EVENT_TYPES,
    EventType,
    GenerationStatus,
    StreamEntry,
    decode_frame,
    encode_body,
    event_body,
    frame_from_body,
    text_sha256,
)
from tokenfan.contract.offsets import Offset, StreamId

U64 = (1 << 64) - 1


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**53), max_value=2**53), st.text(max_size=30)
)
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=8), json_scalars, max_size=3),
)
bodies = st.dictionaries(
    st.text(max_size=12).filter(lambda key: key != "offset"), json_values, min_size=1, max_size=6
)
epochs = st.text(alphabet=string.digits + string.ascii_lowercase, min_size=1, max_size=16)
offsets = st.builds(
    Offset,
    epochs,
    st.builds(StreamId, st.integers(0, U64), st.integers(0, U64)),
)


@settings(max_examples=100, deadline=None)
@given(offsets, bodies)
def test_frame_from_body_is_the_body_with_its_offset_first(offset: Offset, body: dict[str, Any]) -> None:
    frame = frame_from_body(offset, encode_body(body))
    parsed = json.loads(frame)
    assert parsed == {"offset": str(offset), **body}
    assert next(iter(parsed)) == "offset"
    assert frame_from_body(str(offset), encode_body(body)) == frame


@settings(max_examples=100, deadline=None)
@given(offsets, bodies)
def test_stream_entry_frame_matches_frame_from_body(offset: Offset, body: dict[str, Any]) -> None:
    encoded = encode_body(body)
    entry = StreamEntry(offset.stream_id, offset.epoch.encode(), encoded.encode())
    frame = entry.frame()
    assert json.loads(frame) == {"offset": str(offset), **body}
    assert frame.decode() == frame_from_body(offset, encoded)
    assert entry.offset() == offset


@pytest.mark.parametrize("body", ["", "{}", "[1,2]", " {}", "null"])
def test_frame_from_body_refuses_what_is_not_a_non_empty_object(body: str) -> None:
    with pytest.raises(ValueError, match="non-empty JSON object"):
        frame_from_body("e:1-0", body)


def test_encode_body_keeps_non_ascii_as_utf8() -> None:
    text = "héllo 世界 🎉 Ω\u2028"
    encoded = encode_body({"content": text})
    assert "\\u" not in encoded
    assert text in encoded
    assert encoded == '{"content":"' + text + '"}'
    assert json.loads(encoded.encode("utf-8")) == {"content": text}
    # Compact: CJK and emoji cost their UTF-8 bytes, not six ASCII bytes per code unit.
    assert len(encode_body({"c": "世界"}).encode()) == len('{"c":""}') + 6


def test_encode_body_is_compact() -> None:
    assert encode_body({"a": 1, "b": [1, 2], "c": {"d": None}}) == '{"a":1,"b":[1,2],"c":{"d":null}}'


def test_event_body_order_and_explicit_null() -> None:
    body = event_body(
        EventType.GENERATION_COMPLETED,
        session_id="s1",
        generation_id="gen_x",
        seq=7,
        finish_reason=None,
        usage={"total_tokens": 3},
    )
    assert list(body) == ["type", "session_id", "generation_id", "seq", "finish_reason", "usage"]
    assert body["finish_reason"] is None
    encoded = encode_body(body)
    assert '"finish_reason":null' in encoded
    assert json.loads(encoded) == {
        "type": "generation.completed",
        "session_id": "s1",
        "generation_id": "gen_x",
        "seq": 7,
        "finish_reason": None,
        "usage": {"total_tokens": 3},
    }


def test_event_types_and_terminality() -> None:
    terminal = {t for t in EventType if t.is_terminal}
    assert terminal == {
        EventType.GENERATION_COMPLETED,
        EventType.GENERATION_FAILED,
        EventType.GENERATION_CANCELLED,
    }
    assert EventType.DELTA.value == "delta"
    assert EventType.GENERATION_RESTARTED.value == "generation.restarted"


def test_generation_statuses_and_terminality() -> None:
    terminal = {status for status in GenerationStatus if status.is_terminal}
    assert terminal == {GenerationStatus.COMPLETED, GenerationStatus.FAILED, GenerationStatus.CANCELLED}
    assert {str(event) for event in TERMINAL_EVENT_TYPES} == {f"generation.{s}" for s in terminal}


def test_text_sha256_is_the_hex_digest_of_the_utf8_text() -> None:
    assert text_sha256("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert text_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert text_sha256("héllo 世界") == hashlib.sha256("héllo 世界".encode()).hexdigest()
    assert text_sha256("héllo 世界") != hashlib.sha256("héllo 世界".encode("utf-16")).hexdigest()


@settings(max_examples=100, deadline=None)
@given(offsets, bodies.map(lambda body: {**body, "type": "delta"}))
def test_decode_frame_gives_back_what_the_frame_carries(offset: Offset, body: dict[str, Any]) -> None:
    frame = frame_from_body(offset, encode_body(body))
    assert decode_frame(frame) == {"offset": str(offset), **body}
    assert decode_frame(frame.encode()) == decode_frame(frame)


@pytest.mark.parametrize(
    "frame",
    ["", "not json", "[1,2]", '"delta"', "null", "{}", '{"type":1}', '{"type":null}', '{"offset":"e:1-0"}'],
)
def test_decode_frame_refuses_what_is_not_an_object_with_a_type(frame: str) -> None:
    with pytest.raises(ValueError, match=r"Expecting value|Extra data|a frame is a JSON object"):
        decode_frame(frame)
