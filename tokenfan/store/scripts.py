"""The store's Lua scripts: each read once from ``lua/<name>.lua`` and registered on a client.

Why scripts: each step that must be atomic (append an event *and* record the text it adds *and* publish it
to the relays; finish a generation *and* hand the session to the next one) runs as one script on the one
slot that holds the session, so no crash between two commands can leave a half-written state.

Each file starts with a header stating its KEYS, ARGV and reply. Every key a script touches is one of its
KEYS, never a name it builds, so a Redis Cluster client can route each call to the node holding its
session (tests/store/test_scripts.py checks both against a cluster-mode server). The session's pub/sub
channel is a KEY of the write script too: the SPUBLISH documentation says a shard channel is assigned to a
slot by the same algorithm as a key, and must be published on the node owning that slot; a script is
checked likewise (on Valkey 9, a script whose SPUBLISH channel lies in another slot than its keys fails
with "Script attempted to access keys that do not hash to the same slot"). So the channel is declared like
a key: the write script publishes with SPUBLISH, so a token goes only to the node owning its session. The
global cancellation channel is a classic channel, bound to no slot (a cluster hands it to every node: rare
messages), and stays in ARGV.

The files carry no ``#!lua`` line: its flags would add nothing the KEYS discipline does not already give,
and the check above covers what a cluster node cannot see.
"""

from __future__ import annotations

from importlib import resources

from redis.commands.core import AsyncScript

from tokenfan.store.connection import Client
from tokenfan.store.write_layout import lua_prelude

__all__ = ["SOURCES", "Scripts"]


def _read(name: str) -> str:
    return resources.files("tokenfan.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


_COMMON = _read("common")
_DS_COMMON = _read("ds_common")

#: Each script's whole text, as Redis runs it: read when this module is first imported, never again.
SOURCES: dict[str, str] = {
    "accept": _COMMON + _read("accept"),
    "app_event": _COMMON + _DS_COMMON + _read("app_event"),
    "ds_append": _DS_COMMON + _read("ds_append"),
    "ds_create": _DS_COMMON + _read("ds_create"),
    "ds_delete": _read("ds_delete"),
    "ds_meta": _DS_COMMON + _read("ds_meta"),
    "cancel": _read("cancel"),
    "generation": _read("generation"),
    "lease": _read("lease"),
    "position": _COMMON + _read("position"),
    "rate": _read("rate"),
    "read": _read("read"),
    "read_back": _read("read_back"),
    "replay": _COMMON + _read("replay"),
    "snapshot": _COMMON + _read("snapshot"),
    "start": _read("start"),
    "write": _COMMON + lua_prelude() + _read("write"),
}


class Scripts:
    """The scripts, registered on one client. Registering sends nothing: a call goes out as EVALSHA, and
    redis-py loads the script on the one reply that says Redis does not hold it."""

    __slots__ = (
        "accept",
        "app_event",
        "cancel",
        "ds_append",
        "ds_create",
        "ds_delete",
        "ds_meta",
        "generation",
        "lease",
        "position",
        "rate",
        "read",
        "read_back",
        "replay",
        "snapshot",
        "start",
        "write",
    )

    def __init__(self, redis: Client) -> None:
        self.accept = AsyncScript(redis, SOURCES["accept"])  # type: ignore[arg-type]
        self.cancel = AsyncScript(redis, SOURCES["cancel"])  # type: ignore[arg-type]
        self.app_event = AsyncScript(redis, SOURCES["app_event"])  # type: ignore[arg-type]
        self.ds_append = AsyncScript(redis, SOURCES["ds_append"])  # type: ignore[arg-type]
        self.ds_create = AsyncScript(redis, SOURCES["ds_create"])  # type: ignore[arg-type]
        self.ds_delete = AsyncScript(redis, SOURCES["ds_delete"])  # type: ignore[arg-type]
        self.ds_meta = AsyncScript(redis, SOURCES["ds_meta"])  # type: ignore[arg-type]
        self.generation = AsyncScript(redis, SOURCES["generation"])  # type: ignore[arg-type]
        self.lease = AsyncScript(redis, SOURCES["lease"])  # type: ignore[arg-type]
        self.position = AsyncScript(redis, SOURCES["position"])  # type: ignore[arg-type]
        self.rate = AsyncScript(redis, SOURCES["rate"])  # type: ignore[arg-type]
        self.read = AsyncScript(redis, SOURCES["read"])  # type: ignore[arg-type]
        self.read_back = AsyncScript(redis, SOURCES["read_back"])  # type: ignore[arg-type]
        self.replay = AsyncScript(redis, SOURCES["replay"])  # type: ignore[arg-type]
        self.snapshot = AsyncScript(redis, SOURCES["snapshot"])  # type: ignore[arg-type]
        self.start = AsyncScript(redis, SOURCES["start"])  # type: ignore[arg-type]
        self.write = AsyncScript(redis, SOURCES["write"])  # type: ignore[arg-type]
