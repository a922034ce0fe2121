"""The write script's arguments: one layout, read by Python and by Lua alike. Pure: no Redis."""

from __future__ import annotations

import re

from redis.asyncio.connection import Connection

from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.keys import SessionKeys
from tokenfan.store.scripts import SOURCES
from tokenfan.store.write_layout import (
    MODE_APPEND,
    MODE_FINISH,
    EventWrite,
    Finish,
    FinishArgs,
    ItemHead,
    ItemKeys,
    WriteCall,
    WriteItem,
    item_keys,
    lua_prelude,
    packed_write,
    write_arguments,
)


def _constants(prelude: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for names, assigned in re.findall(r"^local (.+?) = (.+)$", prelude, re.MULTILINE):
        values.update(zip(names.split(", "), assigned.split(", "), strict=True))
    return values


def test_the_prelude_gives_each_field_its_offset_in_its_group() -> None:
    constants = _constants(lua_prelude())
    assert constants["KEY_EVENTS"] == "0"
    assert constants["KEY_LIVE"] == str(ItemKeys._fields.index("live"))
    assert constants["KEY_SIZE"] == str(len(ItemKeys._fields))
    assert constants["EVENT_BODY"] == "1"
    assert constants["EVENT_SIZE"] == str(len(EventWrite._fields))
    assert constants["EVENT_RESTARTS"] == "4"
    assert constants["FINISH_ERROR"] == "3"
    assert constants["CALL_ITEM_COUNT"] == str(len(WriteCall._fields) - 1)
    assert constants["MODE_FINISH"] == f"'{MODE_FINISH}'"


def test_the_write_script_names_no_offset_the_layout_lacks() -> None:
    """A field renamed in Python but not in write.lua would be a nil offset: fail here, not at run time."""
    defined = set(_constants(lua_prelude()))
    used = set(re.findall(r"\b(?:CALL|KEY|HEAD|EVENT|FINISH|MODE)_[A-Z_]+\b", SOURCES["write"]))
    assert used <= defined
    assert SOURCES["write"].index(lua_prelude()) < SOURCES["write"].index("local now_ms")


def test_arguments_follow_the_layout_item_by_item() -> None:
    finish = Finish(GenerationStatus.FAILED, None, None, {"type": "x"})
    appending = WriteItem("s1", "g1", 2, [EventWrite(5, "b5", "t"), EventWrite(6, "b6", "", "r")])
    finishing = WriteItem("s2", "g2", 1, [EventWrite(1, "b1")], finish, tool_calls="[]")
    call = WriteCall(now_ms=7, maxlen=1000, ttl=60, epoch_candidate="e", item_count=2)
    keys, args = write_arguments([appending, finishing], call)
    assert keys == [*item_keys("s1", "g1"), *item_keys("s2", "g2")]
    assert args == [
        *call,
        *ItemHead(MODE_APPEND, 2, "g1", 2, ""),
        *EventWrite(5, "b5", "t", ""),
        *EventWrite(6, "b6", "", "r"),
        *ItemHead(MODE_FINISH, 1, "g2", 1, "[]"),
        *EventWrite(1, "b1", "", ""),
        *FinishArgs("failed", "", "", '{"type": "x"}'),
    ]


def test_item_keys_are_the_sessions_and_the_generations_names() -> None:
    names = SessionKeys("s")
    keys = item_keys("s", "g")
    assert keys.events == names.events
    assert keys.live == names.live
    assert (keys.gen, keys.text, keys.reasoning) == (
        names.generation("g"),
        names.generation_text("g"),
        names.generation_reasoning("g"),
    )
    assert item_keys("s", "g") is keys  # built once per generation, not once per flush


def test_the_packed_call_is_what_a_client_packs_from_the_arguments() -> None:
    """The flush sends `packed_write`'s bytes as they are: they must be the very command redis-py packs
    (its pure-Python packer, the reference) from the keys and arguments, non-ASCII text and a finish included."""
    finish = Finish(GenerationStatus.COMPLETED, "stop", {"total_tokens": 3})
    items = [
        WriteItem(
            "s1", "g1", 2, [EventWrite(5, '{"c":"héllo ✓"}', "héllo ✓"), EventWrite(6, "b6", "", "r", 1)]
        ),
        WriteItem("sé", "g2", 1, [], finish, tool_calls='[{"index":0}]'),
        WriteItem("s1", "g3", 1, [EventWrite(1, "b1")]),
    ]
    call = WriteCall(now_ms=1_700_000_000_000, maxlen=1000, ttl=60, epoch_candidate="e", item_count=3)
    keys, args = write_arguments(items, call)
    sha = "0123456789abcdef0123456789abcdef01234567"
    expected = b"".join(Connection().pack_command("EVALSHA", sha, len(keys), *keys, *args))
    assert packed_write(sha, items, call) == expected
    assert packed_write(sha, items, call) == expected  # the keys from the cache, the second time
