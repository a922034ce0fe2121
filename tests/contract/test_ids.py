"""Identifiers: which session ids are accepted (exactly the documented charset), and that generation ids and
epochs are well formed, fresh, and (generation ids) sortable by creation time.
"""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfan.contract.ids import (
    GENERATION_ID_PATTERN,
    SESSION_ID_MAX_LENGTH,
    generation_time_ms,
    is_generation_id,
    is_session_id,
    new_epoch,
    new_generation_id,
)
from tokenfan.contract.offsets import EPOCH_PATTERN, parse_offset

SESSION_CHARS = string.ascii_letters + string.digits + "._-"
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


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


@given(st.integers(min_value=0, max_value=(1 << 48) - 1))
def test_a_generation_id_tells_when_it_was_minted(now_ms: int) -> None:
    assert generation_time_ms(new_generation_id(now_ms)) == now_ms


@pytest.mark.parametrize(
    "value", ["", "gen_", "resp_01M85JSR67842W2YC56KNRN9TW", "gen_01m85jsr67842w2yc56knrn9tw"]
)
def test_only_a_generation_id_has_a_mint_time(value: str) -> None:
    with pytest.raises(ValueError, match="not a generation id"):
        generation_time_ms(value)
