"""Offsets and stream ids: every offset a server sends parses back to itself, anything else is refused as
`InvalidOffset` (HTTP 400, close 4400), and stream ids order the way Redis orders entries.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfan.contract.errors import (
    InvalidOffset,
)
from tokenfan.contract.offsets import Offset, StreamId, parse_offset

U64 = (1 << 64) - 1
#: The largest part an offset may carry: 19 digits (the stream's own ids are milliseconds and a counter).
LARGEST = 10**19 - 1


@pytest.mark.parametrize(
    "text",
    ["e:0-0", "abc123:1732406400123-0", "z:1-7", "0123456789abcdef:1-1", f"e:{LARGEST}-{LARGEST}"],
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
        "e:" + "1" * 20 + "-0",  # ms with more than 19 digits
        "e:1-" + "1" * 20,
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
    st.integers(min_value=0, max_value=LARGEST),
    st.integers(min_value=0, max_value=LARGEST),
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
