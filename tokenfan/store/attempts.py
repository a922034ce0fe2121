"""A worker's hold on a generation: taking it for an attempt, and the lease that proves the attempt alive.

**Fencing.** `start` hands out the attempt number every later write of that attempt carries; a write (or
a lease renewal) from an older attempt (a worker presumed dead that wakes up) is refused, so two attempts
never interleave in one stream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tokenfan.contract.ids import new_epoch
from tokenfan.contract.keys import SessionKeys
from tokenfan.store.batch import ScriptCall, run_calls
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, now_ms
from tokenfan.store.records import LeaseReply, StartOutcome, StartResult

__all__ = ["Attempts"]


class Attempts(StoreCore):
    @storage_call
    async def start(self, session_id: str, generation_id: str) -> StartResult:
        """Take a generation for a new attempt; see `StartOutcome` for what the caller does next."""
        keys = SessionKeys(session_id)
        token = new_epoch() + new_epoch()  # this call's own: a retry of it gets the same attempt back
        outcome, attempt, seq, request, cancel = await self.scripts.start(
            keys=[keys.generation(generation_id), keys.queue],
            args=[now_ms(), self.lease_ms, self.max_attempts, token, generation_id],
        )
        kind = StartOutcome(outcome.decode())
        if kind is StartOutcome.BUSY:
            return StartResult(kind, 0, 0, None, busy_for_ms=int(attempt))
        return StartResult(
            kind,
            int(attempt),
            int(seq),
            json.loads(request) if request else None,
            cancel_requested=cancel.decode(),
        )

    @storage_call
    async def renew_leases(self, running: Sequence[tuple[str, str, int]]) -> list[str]:
        """Extend the lease of each running (session, generation, attempt), proving its worker alive.

        Returns, per entry, ``''``, the cancellation reason when one was requested, or
        `LeaseReply.FENCED` (``'fenced'``) when the attempt lost the generation. One round trip for all.
        """
        if not running:
            return []
        until = now_ms() + self.lease_ms
        calls: list[ScriptCall] = [
            (self.scripts.lease, [SessionKeys(session_id).generation(generation_id)], [attempt, until])
            for session_id, generation_id, attempt in running
        ]
        replies = await run_calls(self.topology, calls)
        return [_lease_answer(code, reason) for code, reason in replies]

    @storage_call
    async def release_lease(self, session_id: str, generation_id: str, attempt: int) -> None:
        """Give a running generation back (shutdown): the next worker restarts it without waiting."""
        keys = [SessionKeys(session_id).generation(generation_id)]
        await self.scripts.lease(keys=keys, args=[attempt, 0])


def _lease_answer(code: bytes, reason: bytes) -> str:
    if LeaseReply(code.decode()) is LeaseReply.FENCED:
        return LeaseReply.FENCED
    return reason.decode()
