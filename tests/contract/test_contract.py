"""The pure wire contract: ids, offsets, event bodies and frames, the error tree, key names."""

from __future__ import annotations

import json
import re
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfan.contract import errors
from tokenfan.contract.errors import (
    ClientError,
    Conflict,
    Forbidden,
    GenerationNotFound,
    InvalidOffset,
    InvalidRequest,
    InvalidSessionId,
    NotFound,
    OffsetGone,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    SessionNotFound,
    StorageUnavailable,
    TokenfanError,
    Unauthorized,
    UnknownOffset,
)
from tokenfan.contract.events import EventType, StreamEntry, encode_body, event_body, frame_from_body
from tokenfan.contract.ids import (
    GENERATION_ID_PATTERN,
    SESSION_ID_MAX_LENGTH,
    is_generation_id,
    is_session_id,
    new_epoch,
    new_generation_id,
)
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import EPOCH_PATTERN, Offset, StreamId, parse_offset
from tokenfan.store import slot_of

U64 = (1 << 64) - 1
SESSION_CHARS = string.ascii_letters + string.digits + "._-"
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# --- session ids


@pytest.mark.parametrize(
    "value",
    ["a", "Z", "7", "a" * SESSION_ID_MAX_LENGTH, "user-42.chat_1", "0.-_", "A" + "_" * 127],
)
def test_session_id_accepts_the_documented_charset(value: str) -> None:
    assert is_session_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * (SESSION_ID_MAX_LENGTH + 1),
        ".abc",
        "-abc",
        "_abc",
        "a{b}",
        "{abc}",
        "a}b",
        "a/b",
        "a b",
        " ab",
        "ab\n",
        "a\tb",
        "café",
        "ａｂｃ",  # fullwidth letters
        "١٢٣",  # Arabic-Indic digits
        "a:b",
        "a%2Fb",
    ],
)
def test_session_id_rejects_everything_else(value: str) -> None:
    assert not is_session_id(value)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=140))
def test_session_id_matches_its_definition(value: str) -> None:
    expected = (
        1 <= len(value) <= 128
        and value[0] in string.ascii_letters + string.digits
        and all(char in SESSION_CHARS for char in value)
    )
    assert is_session_id(value) is expected


# --- generation ids and epochs


def test_generation_ids_match_their_pattern() -> None:
    ids = [new_generation_id() for _ in range(50)] + [new_generation_id(0), new_generation_id((1 << 48) - 1)]
    for generation_id in ids:
        assert re.fullmatch(GENERATION_ID_PATTERN, generation_id), generation_id
        assert is_generation_id(generation_id)
    assert len(set(ids)) == len(ids)


def test_generation_id_encodes_its_creation_time() -> None:
    now_ms = 1_732_406_400_123
    generation_id = new_generation_id(now_ms)
    decoded = 0
    for char in generation_id[4:14]:
        decoded = decoded * 32 + CROCKFORD.index(char)
    assert decoded == now_ms


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=(1 << 48) - 1), min_size=2, max_size=20, unique=True))
def test_generation_ids_sort_by_creation_time(times: list[int]) -> None:
    times.sort()
    ids = [new_generation_id(now_ms) for now_ms in times]
    assert sorted(ids) == ids


@pytest.mark.parametrize(
    "value",
    ["", "gen_", "gen_" + "0" * 25, "gen_" + "0" * 27, "GEN_" + "0" * 26, "gen_" + "I" * 26, "x" * 30],
)
def test_is_generation_id_rejects_malformed(value: str) -> None:
    assert not is_generation_id(value)


def test_epochs_are_short_lowercase_base36_and_fresh() -> None:
    epochs = [new_epoch() for _ in range(200)]
    for epoch in epochs:
        assert re.fullmatch(r"[0-9a-z]{8}", epoch)
        assert re.fullmatch(EPOCH_PATTERN, epoch)
        assert parse_offset(f"{epoch}:1-0").epoch == epoch
    assert len(set(epochs)) == len(epochs)


# --- offsets and stream ids


@pytest.mark.parametrize(
    "text",
    ["e:0-0", "abc123:1732406400123-0", "z:1-7", "0123456789abcdef:1-1", f"e:{U64}-{U64}"],
)
def test_parse_offset_round_trips(text: str) -> None:
    offset = parse_offset(text)
    assert str(offset) == text
    assert parse_offset(str(offset)) == offset


def test_parse_offset_fields() -> None:
    offset = parse_offset("k3y:1732406400123-5")
    assert offset == Offset("k3y", StreamId(1732406400123, 5))
    assert offset.epoch == "k3y"
    assert offset.stream_id.ms == 1732406400123
    assert offset.stream_id.seq == 5


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":1-0",  # missing epoch
        "1-0",  # no epoch at all
        "ABC:1-0",  # uppercase epoch
        "Abc:1-0",
        "a" * 17 + ":1-0",  # epoch longer than 16
        "e:" + "1" * 21 + "-0",  # ms with more than 20 digits
        "e:1-" + "1" * 21,
        "e:" + "1" * 70 + "-0",  # far too long
        "e:1",  # no seq
        "e:1-",
        "e:-1",
        "e:1-x",
        "e:x-1",
        "e:1.5-0",
        "e:+1-0",
        "e:-1-0",
        "e: 1-0",
        " e:1-0",
        "e:1-0 ",
        "e:1-0\n",
        "e:1_0-0",
        "e::1-0",
        "e:1-0:1-0",
        f"e:{U64 + 1}-0",  # beyond u64
        f"e:0-{U64 + 1}",
        "e:99999999999999999999-0",
    ],
)
def test_parse_offset_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidOffset):
        parse_offset(text)


def test_invalid_offset_is_a_400_client_error() -> None:
    with pytest.raises(InvalidOffset) as caught:
        parse_offset("nope")
    assert caught.value.http_status == 400
    assert caught.value.close_code == 4400
    assert caught.value.to_body()["error"] == {
        "code": "invalid_offset",
        "message": caught.value.message,
        "status": 400,
    }


@pytest.mark.parametrize("text", ["e:١٢٣-0", "e:1-٣", "e:１-0"])
def test_parse_offset_accepts_only_ascii_digits(text: str) -> None:
    """An offset is exactly what the server sent: `<epoch>:<ms>-<seq>` in ASCII. A non-ASCII digit (which
    Python's regex ``\\d`` and ``int`` accept) is a malformed offset, not another spelling of a valid one."""
    with pytest.raises(InvalidOffset):
        parse_offset(text)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(
            "{}:{}-{}".format,
            st.text(alphabet=string.ascii_letters + string.digits, max_size=18),
            st.text(alphabet=string.digits, max_size=22),
            st.text(alphabet=string.digits, max_size=22),
        ),
    )
)
def test_parse_offset_never_fails_unexpectedly(text: str) -> None:
    try:
        offset = parse_offset(text)
    except InvalidOffset:
        return
    assert parse_offset(str(offset)) == offset
    assert 0 <= offset.stream_id.ms <= U64
    assert 0 <= offset.stream_id.seq <= U64


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet=string.digits + string.ascii_lowercase, min_size=1, max_size=16),
    st.integers(min_value=0, max_value=U64),
    st.integers(min_value=0, max_value=U64),
)
def test_every_valid_offset_round_trips(epoch: str, ms: int, seq: int) -> None:
    offset = Offset(epoch, StreamId(ms, seq))
    assert parse_offset(str(offset)) == offset


def test_stream_id_orders_like_redis() -> None:
    ids = [StreamId(2, 0), StreamId(1, 10), StreamId(1, 2), StreamId(0, 0), StreamId(10, 0), StreamId(1, 9)]
    assert sorted(ids) == [
        StreamId(0, 0),
        StreamId(1, 2),
        StreamId(1, 9),
        StreamId(1, 10),
        StreamId(2, 0),
        StreamId(10, 0),
    ]
    assert StreamId.ZERO < StreamId(0, 1) < StreamId(1, 0)
    # Numeric, not lexicographic: "10-0" sorts after "9-0" in Redis.
    assert StreamId.parse("10-0") > StreamId.parse("9-0")
    assert StreamId.parse(b"1732406400123-4") == StreamId(1732406400123, 4)
    assert str(StreamId(1732406400123, 4)) == "1732406400123-4"


@pytest.mark.parametrize("text", ["", "1", "1-", "-1", "a-1", f"{U64 + 1}-0", "1-0-0"])
def test_stream_id_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidOffset):
        StreamId.parse(text)


# --- event bodies and frames

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


# --- the error tree

#: (class, parent, http status, close code or None where the tree shows none, code) as in errors.py.
ERROR_TABLE: list[tuple[type[TokenfanError], type[Exception], int, int | None, str]] = [
    (InvalidRequest, ClientError, 400, 4400, "invalid_request"),
    (InvalidSessionId, InvalidRequest, 400, 4400, "invalid_session_id"),
    (InvalidOffset, InvalidRequest, 400, 4400, "invalid_offset"),
    (Unauthorized, ClientError, 401, 4401, "unauthorized"),
    (Forbidden, ClientError, 403, 4403, "forbidden"),
    (NotFound, ClientError, 404, 4404, "not_found"),
    (GenerationNotFound, NotFound, 404, None, "generation_not_found"),
    (SessionNotFound, NotFound, 404, None, "session_not_found"),
    (UnknownOffset, NotFound, 404, 4404, "unknown_offset"),
    (Conflict, ClientError, 409, 4409, "conflict"),
    (OffsetGone, ClientError, 410, 4410, "offset_gone"),
    (PayloadTooLarge, ClientError, 413, 1009, "payload_too_large"),
    (RateLimited, ClientError, 429, 4429, "rate_limited"),
    (ServiceUnavailable, ServerError, 503, 1013, "unavailable"),
    (StorageUnavailable, ServiceUnavailable, 503, 1013, "unavailable"),
]


@pytest.mark.parametrize(
    ("cls", "parent", "status", "close_code", "code"),
    ERROR_TABLE,
    ids=[row[0].__name__ for row in ERROR_TABLE],
)
def test_error_carries_its_wire_consequence(
    cls: type[TokenfanError], parent: type[Exception], status: int, close_code: int | None, code: str
) -> None:
    assert issubclass(cls, parent)
    error = cls("something precise went wrong")
    assert error.http_status == status
    if close_code is not None:
        assert error.close_code == close_code
    assert error.code == code
    assert error.message == "something precise went wrong"
    assert str(error) == "something precise went wrong"
    assert error.to_body() == {
        "error": {"code": code, "message": "something precise went wrong", "status": status}
    }
    assert json.loads(json.dumps(error.to_body())) == error.to_body()


def test_error_tree_roots() -> None:
    assert issubclass(ClientError, TokenfanError)
    assert issubclass(ServerError, TokenfanError)
    assert not issubclass(ClientError, ServerError)
    for cls, *_ in ERROR_TABLE:
        assert issubclass(cls, TokenfanError)
        assert issubclass(cls, ClientError) != issubclass(cls, ServerError)
    assert 400 <= ClientError.http_status < 500
    assert ServerError.http_status == 500


def test_error_table_covers_every_exported_error() -> None:
    listed = {row[0].__name__ for row in ERROR_TABLE} | {"TokenfanError", "ClientError", "ServerError"}
    assert listed == set(errors.__all__)


# --- key names and cluster slots


def _crc16_xmodem(data: bytes) -> int:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: str) -> int:
    """The Redis Cluster slot of a key: hash only the first non-empty ``{...}`` when there is one."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16_xmodem(raw) % 16384


def test_key_slot_helper_matches_published_vectors() -> None:
    assert _crc16_xmodem(b"123456789") == 0x31C3
    assert key_slot("foo") == 12182
    assert key_slot("somekey") == 11058
    assert key_slot("foo{hash_tag}") == key_slot("hash_tag") == 2515
    assert key_slot("foo{}{bar}") == _crc16_xmodem(b"foo{}{bar}") % 16384  # an empty tag hashes it all
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")


@pytest.mark.parametrize("session_id", ["a", "user-42.chat_1", "Z" * 128, "0"])
def test_session_keys_share_one_hash_tag_and_slot(session_id: str) -> None:
    keys = SessionKeys(session_id)
    generation_id = new_generation_id()
    names = [
        keys.events,
        keys.meta,
        keys.queue,
        keys.generations,
        keys.live,
        keys.generation(generation_id),
        keys.generation_text(generation_id),
        f"{keys.tag}:idem:some-key",
    ]
    assert len(set(names)) == len(names)
    expected = slot_of(session_id)
    for name in names:
        assert name.startswith(f"tf:{{{session_id}}}:")
        assert name.count("{") == 1
        assert name.count("}") == 1
        assert key_slot(name) == expected, name
    assert key_slot(session_id) == expected


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        str.__add__,
        st.sampled_from(string.ascii_letters + string.digits),
        st.text(alphabet=SESSION_CHARS, max_size=127),
    )
)
def test_slot_of_agrees_with_the_cluster_rule(session_id: str) -> None:
    keys = SessionKeys(session_id)
    assert key_slot(keys.events) == key_slot(keys.generation_text("gen_x")) == slot_of(session_id)
