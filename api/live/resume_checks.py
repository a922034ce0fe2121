"""Resume checks of one session's subscribers, made together: one script call for all that arrive at once.

A storm of reconnects brings many subscribers of a session within a few milliseconds, each with an offset to
validate (`Store.check_resume`). One script call each is a round trip, a pooled connection and a reply to
parse each, about 65 µs of the process's CPU apiece. Here a check that arrives while its session's previous
call is on its way waits for it to return, then goes out with every other check that waited, in one call
(`Store.resume_verdicts`): the first check of a quiet session goes out at once, and under a storm the calls
are as few as the round trips allow.

Each verdict is what the check's own call would have answered: a check joins only a call not yet sent, so
the script runs after the subscriber asked, as its own call would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import PositionReply, Store, resume_point

__all__ = ["MAX_CHECKS_PER_CALL", "ResumeChecks"]

#: Offsets checked in one script call at most (a call's time in Redis grows with them).
MAX_CHECKS_PER_CALL = 256

_Waiting = list[tuple[Offset, asyncio.Future[PositionReply]]]


class ResumeChecks:
    """`Store.check_resume`, with the checks of a session that arrive together made in one call."""

    def __init__(self, store: Store, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.store = store
        self.spawn = spawn
        self._waiting: dict[str, _Waiting] = {}  # by session: the checks not sent yet
        self._sending: set[str] = set()  # sessions with a call on its way

    async def check(self, session_id: str, offset: Offset | None) -> StreamId:
        """Where a subscriber resuming after `offset` reads after, as `Store.check_resume` answers."""
        if offset is None:
            return await self.store.check_resume(session_id, None)
        verdict: asyncio.Future[PositionReply] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(session_id, []).append((offset, verdict))
        if session_id not in self._sending:
            self._sending.add(session_id)
            self.spawn(self._send(session_id))
        return resume_point(offset, await verdict)

    async def _send(self, session_id: str) -> None:
        """Call for the session's waiting checks, and again for those that arrived meanwhile, until none wait."""
        waiting: _Waiting = []
        try:
            while waiting := self._take(session_id):
                try:
                    verdicts = await self.store.resume_verdicts(session_id, [offset for offset, _ in waiting])
                except Exception as exc:  # StorageUnavailable: each waiting subscriber fails with it
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), answer in zip(waiting, verdicts, strict=True):
                    if not future.done():  # else its subscriber left (cancelled) meanwhile
                        future.set_result(answer)
        finally:  # cancelled (the bus closes): nobody is left waiting for an answer
            self._sending.discard(session_id)
            for _, future in [*waiting, *self._waiting.pop(session_id, [])]:
                future.cancel()

    def _take(self, session_id: str) -> _Waiting:
        """The session's waiting checks whose subscribers still wait, up to a call's worth."""
        waiting = [
            (offset, future) for offset, future in self._waiting.pop(session_id, []) if not future.done()
        ]
        if len(waiting) > MAX_CHECKS_PER_CALL:
            self._waiting[session_id] = waiting[MAX_CHECKS_PER_CALL:]
        return waiting[:MAX_CHECKS_PER_CALL]
