"""Resume checks shared by the subscribers that resume from the same offset of a session at the same time.

A storm of reconnects to a quiet session brings its subscribers within a few milliseconds, all resuming
after the same offset (the session's last event, which each had received). Each check is a script call
(`Store.check_resume`): a round trip, a pooled connection and a reply to parse, about 40 µs of the process's
CPU apiece, a hundred times over for the same answer. Here a check of an offset whose check is on its way
waits for that one's answer instead.

The answer a joining check gets was made at most one round trip before its own call would have been: a
verdict is only ever as fresh as the instant Redis gave it, and what changes after it (a trim, the stream
recreated) reaches every subscriber the same way whether its check was its own or shared (the catch-up's
reads and the feed see it). Checks of different offsets are not made together: each goes out at once, as
its own call (joining them in one call, waiting for the previous one, cost a storm of reconnects at many
offsets twice the CPU).
"""

from __future__ import annotations

import asyncio

from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import Store

__all__ = ["ResumeChecks"]


class ResumeChecks:
    """`Store.check_resume`, one call in flight per session and offset."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: dict[tuple[str, Offset], asyncio.Future[StreamId]] = {}

    async def check(self, session_id: str, offset: Offset | None) -> StreamId:
        """Where a subscriber resuming after `offset` reads after, as `Store.check_resume` answers."""
        if offset is None:
            return await self.store.check_resume(session_id, None)
        key = (session_id, offset)
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.store.check_resume(session_id, offset))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(pending)  # one subscriber leaving leaves the others' check alone

    def _done(self, key: tuple[str, Offset], done: asyncio.Future[StreamId]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]
        if not done.cancelled():
            done.exception()  # retrieved: every subscriber waiting for it may have left
