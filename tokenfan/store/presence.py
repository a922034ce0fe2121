"""Who is watching: processes with subscribers of a session claim it, so that a generation asked to stop
when nobody watches (``cancel_when_unwatched_seconds``) can tell."""

from __future__ import annotations

from collections.abc import Sequence

from tokenfan.contract.keys import SessionKeys
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, now_ms

__all__ = ["Presence"]


class Presence(StoreCore):
    @storage_call
    async def claim_watching(self, session_ids: Sequence[str], owner: str, ttl_ms: int) -> None:
        """This process has subscribers of these sessions, for the next `ttl_ms` (renew before it ends)."""
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                key = SessionKeys(session_id).watchers
                pipe.zadd(key, {owner: now + ttl_ms})
                pipe.zremrangebyscore(key, 0, now)
                pipe.pexpire(key, ttl_ms * 2)
            await pipe.execute()

    @storage_call
    async def release_watching(self, session_id: str, owner: str) -> None:
        await self.redis.zrem(SessionKeys(session_id).watchers, owner)

    @storage_call
    async def watched(self, session_ids: Sequence[str]) -> list[bool]:
        """Whether any process currently claims subscribers of each session."""
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.zcount(SessionKeys(session_id).watchers, f"({now}", "+inf")
            counts = await pipe.execute()
        return [bool(count) for count in counts]
