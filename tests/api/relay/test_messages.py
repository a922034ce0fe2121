"""Client messages, parsed once: every message a client may send, and every refusal with its reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.relay.messages import Invalid, Refresh, Subscribe, Unsubscribe, parse_message


def test_the_documented_messages() -> None:
    assert parse_message('{"type": "subscribe", "session_id": "s1"}') == Subscribe("s1")
    assert parse_message(
        json.dumps({"type": "subscribe", "session_id": "s1", "after": "e:1-0", "token": "t"})
    ) == Subscribe("s1", "e:1-0", "t")
    assert parse_message('{"type": "unsubscribe", "session_id": "s1"}') == Unsubscribe("s1")
    assert parse_message('{"type": "refresh", "token": "t"}') == Refresh("t")
    assert parse_message('{"type": "refresh", "token": "t", "session_id": "s1"}') == Refresh("t", "s1")


@pytest.mark.parametrize(
    ("raw", "session_id"),
    [
        (b'{"type": "subscribe", "session_id": "s1"}', None),  # binary frames are refused
        ("not json", None),
        ("[1, 2]", None),
        ('"subscribe"', None),
        ("[" * 100_000, None),  # deeper than the parser goes
        ('{"type": "watch", "session_id": "s1"}', "s1"),
        ('{"type": "subscribe"}', None),
        ('{"type": "subscribe", "session_id": 7}', None),
        ('{"type": "subscribe", "session_id": "s1", "after": 5}', "s1"),
        ('{"type": "subscribe", "session_id": "s1", "token": ["t"]}', "s1"),
        ('{"type": "refresh"}', None),
        ('{"type": "refresh", "token": "t", "session_id": 3}', None),
    ],
)
def test_refusals_say_why_and_name_the_session_when_they_can(
    raw: str | bytes, session_id: str | None
) -> None:
    answer = parse_message(raw)
    assert isinstance(answer, Invalid)
    assert answer.reason
    assert answer.session_id == session_id


@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["type", "session_id", "after", "token", "x"]), inner, max_size=5
                )
            ),
            max_leaves=12,
        ).map(json.dumps),
    )
)
def test_whatever_arrives_is_a_message_or_a_refusal(raw: str | bytes) -> None:
    answer = parse_message(raw)
    assert isinstance(answer, Subscribe | Unsubscribe | Refresh | Invalid)
    if isinstance(answer, Subscribe | Unsubscribe):
        assert isinstance(answer.session_id, str)


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "subscribe", "session_id": "s1"}',
        '{"type": "unsubscribe", "session_id": "s1"}',
        '{"type": "watch"}',
        "{}",
    ],
)
def test_a_single_session_stream_takes_only_refresh(raw: str) -> None:
    answer = parse_message(raw, multi_session=False)
    assert isinstance(answer, Invalid)
    assert "refresh" in answer.reason
    assert answer.session_id is None
    assert parse_message('{"type": "refresh", "token": "t"}', multi_session=False) == Refresh("t")
    assert isinstance(parse_message(b"{}", multi_session=False), Invalid)
