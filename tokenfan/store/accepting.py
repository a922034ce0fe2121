"""The API's side of a generation's life: accepting it, finding it, and asking for it to be cancelled;
and the request rate limit shared by every API process."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable
from typing import Any, cast

from tokenfan.contract.errors import ServiceUnavailable
from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_epoch
from tokenfan.contract.keys import (
    CANCEL_CHANNEL,
    GenerationField,
    SessionKeys,
    generation_index_key,
    rate_limit_key,
)
from tokenfan.runtime.tracing import TRACE_CONTEXT
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, now_ms, pairs
from tokenfan.store.records import (
    AcceptOutcome,
    AcceptReply,
    AcceptResult,
    GenerationRecord,
    ReplayReply,
)

__all__ = ["Accepting", "request_digest"]

#: Calls of the accept script an interrupting accept makes before it gives up: each retry follows a finish
#: (or an accept into an empty queue) that changed the head in the instant between two round trips.
_ACCEPT_TRIES = 5


class Accepting(StoreCore):
    @storage_call
    async def accept(
        self,
        session_id: str,
        generation_id: str,
        *,
        request: dict[str, Any],
        model: str,
        policy: str = "enqueue",
        idempotency_key: str | None = None,
        idempotency_ttl_seconds: int = 86_400,
    ) -> AcceptResult:
        """Record a new generation at the back of its session's queue (or refuse it, per `policy`).

        With ``policy="interrupt"`` on a busy session, the generation at the head of the queue is asked to
        cancel and this one is queued right behind it. An `idempotency_key` seen before answers the
        generation it was given (``DUPLICATE``), or ``REUSED`` when it came with another request or policy
        (nothing is written then). Raises `ServiceUnavailable` (503, try again) in the unlikely case that
        the head changed under each of a few tries."""
        keys = SessionKeys(session_id)
        # The index lets GET /v1/generations/{id} find the session; it outlives the session's own keys.
        await self.redis.set(
            generation_index_key(generation_id), session_id, ex=self.session_ttl_seconds + 86_400, nx=True
        )
        head = await self._queue_head(keys) if policy == "interrupt" else ""
        args: list[str | int] = [
            now_ms(),
            new_epoch(),
            self.session_ttl_seconds,
            generation_id,
            json.dumps(request, ensure_ascii=False, separators=(",", ":")),
            model,
            policy,
            self.generations_kept,
            idempotency_ttl_seconds if idempotency_key else 0,
            CANCEL_CHANNEL,
        ]
        digest = request_digest(request, policy)
        for _ in range(_ACCEPT_TRIES):
            names = _accept_keys(keys, generation_id, idempotency_key, head)
            reply = await self.scripts.accept(keys=names, args=[*args, head, digest])
            code, value, position, epoch = (part.decode() for part in reply)
            if AcceptReply(code) is not AcceptReply.STALE:
                return AcceptResult(AcceptOutcome(code), value, int(position), epoch)
            head = value  # the head now, as the script saw it
        raise ServiceUnavailable("the session's queue kept changing while this generation was accepted")

    @storage_call
    async def replay(
        self, session_id: str, idempotency_key: str, *, request: dict[str, Any], policy: str = "enqueue"
    ) -> AcceptResult | None:
        """What `idempotency_key` already stands for in the session, read before the caller takes or writes
        anything for the request: ``DUPLICATE`` (with the generation it was given, and its queue position),
        ``REUSED`` (it came with another request or policy), or None for a key not seen yet."""
        keys = SessionKeys(session_id)
        reply = await self.scripts.replay(
            keys=[keys.idempotency(idempotency_key), keys.queue, keys.meta],
            args=[request_digest(request, policy)],
        )
        code, generation_id, position, epoch = (part.decode() for part in reply)
        if ReplayReply(code) is ReplayReply.NEW:
            return None
        return AcceptResult(AcceptOutcome(code), generation_id, int(position), epoch)

    async def _queue_head(self, keys: SessionKeys) -> str:
        """The generation at the head of the session's queue ('' for none)."""
        head = await cast(Awaitable[bytes | None], self.redis.lindex(keys.queue, 0))
        return head.decode() if head else ""

    @storage_call
    async def session_of(self, generation_id: str) -> str | None:
        value = await self.redis.get(generation_index_key(generation_id))
        return value.decode() if value is not None else None

    @storage_call
    async def is_queued(self, session_id: str, generation_id: str) -> bool:
        """Whether the generation is accepted and has not started (nor ended) yet."""
        key = SessionKeys(session_id).generation(generation_id)
        status = await cast(Awaitable[bytes | None], self.redis.hget(key, GenerationField.STATUS))
        return status == GenerationStatus.QUEUED.value.encode()

    @storage_call
    async def generation(self, generation_id: str) -> GenerationRecord | None:
        session_id = await self.session_of(generation_id)
        if session_id is None:
            return None
        keys = SessionKeys(session_id)
        names = [
            keys.generation(generation_id),
            keys.generation_text(generation_id),
            keys.generation_reasoning(generation_id),
        ]
        raw, text, reasoning = await self.scripts.generation(keys=names)
        if not raw:
            return None
        return GenerationRecord.from_fields(session_id, generation_id, pairs(raw), text, reasoning)

    @storage_call
    async def request_cancel(
        self, session_id: str, generation_id: str, reason: str
    ) -> GenerationStatus | None:
        """Flag a queued or running generation for cancellation and tell every worker; returns the status
        it had (None when it does not exist). The worker running it ends it with ``generation.cancelled``."""
        status = await self.scripts.cancel(
            keys=[SessionKeys(session_id).generation(generation_id)],
            args=[reason, CANCEL_CHANNEL, generation_id],
        )
        return GenerationStatus(status.decode()) if status else None

    @storage_call
    async def rate_limit(self, name: str, per_minute: int) -> float:
        """Take one request of `name`'s allowance (bursts of a tenth of a minute's worth pass); returns 0
        when allowed, else the seconds to wait. Shared by every process using this Redis."""
        if per_minute <= 0:
            return 0.0
        interval = 60_000 / per_minute
        burst = max(1, per_minute // 10)
        wait = await self.scripts.rate(keys=[rate_limit_key(name)], args=[now_ms(), interval, burst])
        return float(wait) / 1000


def request_digest(request: dict[str, Any], policy: str) -> str:
    """What an Idempotency-Key remembers of the request it came with: the SHA-256 of the request and its
    policy as canonical JSON (members sorted, so their order does not matter). The trace context the API
    may add is not the client's: two sends of one request differ there, and are still one request."""
    asked = {name: value for name, value in request.items() if name != TRACE_CONTEXT}
    canonical = json.dumps({"policy": policy, "request": asked}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _accept_keys(keys: SessionKeys, generation_id: str, idempotency_key: str | None, head: str) -> list[str]:
    names = [
        keys.meta,
        keys.generation(generation_id),
        keys.queue,
        keys.generations,
        keys.events,
        keys.idempotency(idempotency_key or ""),
    ]
    if head:
        names.append(keys.generation(head))  # the generation the script is to interrupt
    return names
