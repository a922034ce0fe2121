"""Who is watching: processes with subscribers of a session claim it, so that a generation asked to stop
when nobody watches (``cancel_when_unwatched_seconds``) can tell, and an operator can see the busiest
sessions (``tokenfan top``). Each claim names its process and how many subscribers it serves there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenfan.contract.keys import (
    WATCHERS_PATTERN,
    SessionKeys,
    parse_watcher_claim,
    session_of_watchers_key,
    watcher_claim,
)
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, now_ms

__all__ = ["Presence", "Watched"]

#: A watched session: its id, its subscribers (over every process), and the processes serving them.
Watched = tuple[str, int, int]


class Presence(StoreCore):
    @storage_call
    async def claim_watching(
        self,
        subscribers: Mapping[str, int],
        owner: str,
        ttl_ms: int,
        *,
        previous: Mapping[str, int] | None = None,
    ) -> None:
        """This process serves `subscribers` (by session) for the next `ttl_ms` (renew before it ends).
        `previous` is what it claimed last time: claims whose count changed, or that ended, are removed."""
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id, count in (previous or {}).items():
                if subscribers.get(session_id) != count:
                    pipe.zrem(SessionKeys(session_id).watchers, watcher_claim(owner, count))
            for session_id, count in subscribers.items():
                key = SessionKeys(session_id).watchers
                pipe.zadd(key, {watcher_claim(owner, count): now + ttl_ms})
                pipe.zremrangebyscore(key, 0, now)
                pipe.pexpire(key, ttl_ms * 2)
            await pipe.execute()

    @storage_call
    async def watched(self, session_ids: Sequence[str]) -> list[bool]:
        """Whether any process currently claims subscribers of each session."""
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.zcount(SessionKeys(session_id).watchers, f"({now}", "+inf")
            counts = await pipe.execute()
        return [bool(count) for count in counts]

    @storage_call
    async def busiest(self, limit: int) -> list[Watched]:
        """The `limit` watched sessions with the most subscribers now, most first. Finds them by scanning the
        keyspace (on every primary of a cluster): an operator's occasional view, not a hot path."""
        await self.topology.ready()
        keys: list[bytes] = []
        for node in self.topology.primaries():
            async for key in self.topology.client(node).scan_iter(match=WATCHERS_PATTERN, count=1_000):
                keys.append(key)
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrangebyscore(key, f"({now}", "+inf")
            replies = await pipe.execute()
        sessions = []
        for key, members in zip(keys, replies, strict=True):
            session_id = session_of_watchers_key(key.decode())
            claims = [parse_watcher_claim(member.decode()) for member in members]
            if session_id is not None and claims:
                sessions.append((session_id, sum(count for _, count in claims), len(claims)))
        sessions.sort(key=lambda watched: (-watched[1], -watched[2], watched[0]))
        return sessions[:limit]
