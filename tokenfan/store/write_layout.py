"""The write script's KEYS and ARGV, laid out once.

`Store.write` carries every running generation of a worker process in one script call per flush, so its
arguments are long and positional. Their layout is defined here and nowhere else: each group of arguments
is a NamedTuple whose instances are what the store puts in KEYS and ARGV, and whose ``_fields`` generate
the constants ``write.lua`` indexes them with (`lua_prelude`, prepended to the script when it is loaded).
Adding, removing or reordering a field changes both sides at once.

::

    KEYS  ItemKeys x items
    ARGV  WriteCall, then per item: ItemHead, EventWrite x ItemHead.event_count, FinishArgs if mode is F

The flush path is hot: one call per flush, at hundreds of generations and tens of thousands of tokens a
second. Tuples extend the argument list without touching their fields one by one, and a generation's key
names are built once (`item_keys`), not once per flush. `packed_write` lays the whole call out as the bytes
Redis reads (RESP): a generation's keys are the same at every flush, so they are packed once, when first
written, and each flush joins them in rather than packing eight arguments per generation again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import hiredis

from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.keys import SessionKeys

__all__ = [
    "MODE_APPEND",
    "MODE_FINISH",
    "EventWrite",
    "Finish",
    "FinishArgs",
    "ItemHead",
    "ItemKeys",
    "WriteCall",
    "WriteItem",
    "item_keys",
    "lua_prelude",
    "packed_write",
    "write_arguments",
]

#: `ItemHead.mode`: the item appends events, or appends them and then finishes its generation.
MODE_APPEND = "A"
MODE_FINISH = "F"


class EventWrite(NamedTuple):
    """One event to append; its fields are the event's group of ARGV, in order."""

    seq: int
    body: str  # the encoded event body (`tokenfan.contract.events.encode_body`)
    text: str = ""  # what this event adds to the generation's text
    reasoning: str = ""  # what it adds to the generation's reasoning
    # 1 for ``generation.restarted``: the text, reasoning and tool calls stored so far are a dead attempt's,
    # and go in the same script call that appends this event (a view never mixes two attempts).
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    status: GenerationStatus
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass(slots=True)
class WriteItem:
    session_id: str
    generation_id: str
    attempt: int
    events: list[EventWrite] = field(default_factory=list)
    finish: Finish | None = None
    tool_calls: str = ""  # JSON of the generation's tool calls so far, when they changed ('' = unchanged)


class WriteCall(NamedTuple):
    """The head of ARGV: what holds for every item of the call."""

    now_ms: int
    maxlen: int  # the stream's approximate length cap (XADD MAXLEN ~)
    ttl: int  # seconds every key of a session lives after its generation finishes
    epoch_candidate: str  # the epoch of a stream this call creates
    item_count: int


class ItemKeys(NamedTuple):
    """The keys of one item: every key the script touches for its generation."""

    events: str
    meta: str
    gen: str
    text: str
    queue: str
    generations: str
    reasoning: str
    live: str  # the session's pub/sub channel: it hashes to the session's slot, like a key


class ItemHead(NamedTuple):
    mode: str  # MODE_APPEND or MODE_FINISH
    attempt: int  # the attempt writing: any other attempt's writes are fenced
    generation_id: str
    event_count: int
    tool_calls: str


class FinishArgs(NamedTuple):
    status: str
    finish_reason: str
    usage: str  # JSON, or '' for none
    error: str  # JSON, or '' for none

    @classmethod
    def of(cls, finish: Finish) -> FinishArgs:
        return cls(
            finish.status.value,
            finish.finish_reason or "",
            json.dumps(finish.usage) if finish.usage is not None else "",
            json.dumps(finish.error) if finish.error is not None else "",
        )


#: Lua name prefix of each group's constants: ``KEY_EVENTS`` is the offset of `ItemKeys.events` within an
#: item's keys, ``KEY_SIZE`` the number of keys per item.
_GROUPS: tuple[tuple[str, type[tuple[Any, ...]]], ...] = (
    ("CALL", WriteCall),
    ("KEY", ItemKeys),
    ("HEAD", ItemHead),
    ("EVENT", EventWrite),
    ("FINISH", FinishArgs),
)


def lua_prelude() -> str:
    """Lua locals giving each field's offset within its group (0 for the first) and each group's size."""
    lines = ["-- Generated from tokenfan/store/write_layout.py: offsets of each field within its group."]
    lines.append(f"local MODE_APPEND, MODE_FINISH = '{MODE_APPEND}', '{MODE_FINISH}'")
    for prefix, group in _GROUPS:
        fields: tuple[str, ...] = group._fields  # type: ignore[attr-defined]
        names = [f"{prefix}_{name.upper()}" for name in fields] + [f"{prefix}_SIZE"]
        values = [str(offset) for offset in range(len(fields) + 1)]
        lines.append(f"local {', '.join(names)} = {', '.join(values)}")
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=4096)
def item_keys(session_id: str, generation_id: str) -> ItemKeys:
    """The keys of one generation's items. Cached: a running generation is written once per flush."""
    names = SessionKeys(session_id)
    return ItemKeys(
        events=names.events,
        meta=names.meta,
        gen=names.generation(generation_id),
        text=names.generation_text(generation_id),
        queue=names.queue,
        generations=names.generations,
        reasoning=names.generation_reasoning(generation_id),
        live=names.live,
    )


def write_arguments(items: Sequence[WriteItem], call: WriteCall) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of one write call carrying `items` (``call.item_count`` must be their number)."""
    keys: list[str] = []
    for item in items:
        keys += item_keys(item.session_id, item.generation_id)
    return keys, _argv(items, call)


def packed_write(sha: str, items: Sequence[WriteItem], call: WriteCall) -> bytes:
    """The whole ``EVALSHA sha numkeys KEYS... ARGV...`` command of one write call, as RESP: byte for byte
    what a client packs from `write_arguments`, for less CPU (the keys come packed already)."""
    parts = [_packed_keys(item.session_id, item.generation_id) for item in items]
    key_count = len(items) * len(ItemKeys._fields)
    args = hiredis.pack_command(tuple(_argv(items, call)))  # type: ignore[arg-type]
    arg_count, _, packed_args = args.partition(b"\r\n")  # drop its own header: '*<count>'
    count = 3 + key_count + int(arg_count[1:])
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n" % (count, len(sha), sha.encode())
    number = b"%d" % key_count
    parts.insert(0, b"%b$%d\r\n%b\r\n" % (head, len(number), number))
    parts.append(packed_args)
    return b"".join(parts)


@functools.lru_cache(maxsize=4096)
def _packed_keys(session_id: str, generation_id: str) -> bytes:
    """One generation's keys as RESP arguments (no header). Cached like `item_keys`."""
    packed: bytes = hiredis.pack_command(tuple(item_keys(session_id, generation_id)))  # type: ignore[arg-type]
    return packed.partition(b"\r\n")[2]


def _argv(items: Sequence[WriteItem], call: WriteCall) -> list[str | int]:
    args: list[str | int] = [*call]
    for item in items:
        finish = item.finish
        events = item.events
        mode = MODE_APPEND if finish is None else MODE_FINISH
        args += ItemHead(mode, item.attempt, item.generation_id, len(events), item.tool_calls)
        for event in events:
            args += event
        if finish is not None:
            args += FinishArgs.of(finish)
    return args
