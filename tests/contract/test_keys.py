"""Redis names: every key of a session carries the session id as its one hash tag, so all of them share one
Redis Cluster slot (checked against the cluster's own hashing rule), and no two names collide.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.support.cluster import crc16_xmodem, key_slot
from tokenfan.contract.ids import new_generation_id
from tokenfan.contract.keys import ARQ_QUEUE, CANCEL_CHANNEL, SessionKeys, generation_index_key
from tokenfan.store import slot_of

SESSION_CHARS = string.ascii_letters + string.digits + "._-"
SAMPLE_SESSION_IDS = ["a", "user-42.chat_1", "Z" * 128, "0"]


def test_key_slot_helper_matches_published_vectors() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert key_slot("foo") == 12182
    assert key_slot("somekey") == 11058
    assert key_slot("foo{hash_tag}") == key_slot("hash_tag") == 2515
    assert key_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384  # an empty tag hashes it all
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")


@pytest.mark.parametrize("session_id", SAMPLE_SESSION_IDS)
def test_session_keys_share_one_hash_tag_and_slot(session_id: str) -> None:
    keys = SessionKeys(session_id)
    generation_id = new_generation_id()
    names = [
        keys.events,
        keys.meta,
        keys.queue,
        keys.generations,
        keys.live,
        keys.watchers,
        keys.generation(generation_id),
        keys.generation_text(generation_id),
        keys.generation_reasoning(generation_id),
        keys.generation_response(generation_id),
        f"{keys.tag}:idem:some-key",
    ]
    assert len(set(names)) == len(names)
    expected = key_slot(session_id)
    for name in names:
        assert name.startswith(f"tf:{{{session_id}}}:")
        assert name.count("{") == 1
        assert name.count("}") == 1
        assert key_slot(name) == expected, name


def test_global_names_sit_outside_every_session() -> None:
    generation_id = new_generation_id()
    names = [generation_index_key(generation_id), ARQ_QUEUE, CANCEL_CHANNEL]
    assert generation_index_key(generation_id) == f"tf:generation:{generation_id}"
    assert len(set(names)) == len(names)
    for name in names:
        assert name.startswith("tf:")
        assert "{" not in name  # no hash tag: no session's key (always tagged) can be one of these


def test_keys_of_two_generations_never_collide() -> None:
    keys = SessionKeys("s1")
    first, second = new_generation_id(), new_generation_id()
    per_generation = [
        keys.generation,
        keys.generation_text,
        keys.generation_reasoning,
        keys.generation_response,
    ]
    names = [name(generation_id) for generation_id in (first, second) for name in per_generation]
    assert len(set(names)) == len(names)


# `slot_of` is the store's; this test belongs in tests/store/ and moves there with the store's tests.
@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        str.__add__,
        st.sampled_from(string.ascii_letters + string.digits),
        st.text(alphabet=SESSION_CHARS, max_size=127),
    )
)
@example("a")
@example("user-42.chat_1")
@example("Z" * 128)
@example("0")
def test_slot_of_agrees_with_the_cluster_rule(session_id: str) -> None:
    keys = SessionKeys(session_id)
    assert key_slot(keys.events) == key_slot(keys.generation_text("gen_x")) == slot_of(session_id)
    assert key_slot(session_id) == slot_of(session_id)
