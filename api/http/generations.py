"""What every way into tokenfan shares: accepting a generation under the caller's limits, and cancelling one.

The native route (``POST /v1/sessions/{id}/generations``) and the OpenAI-compatible front door
(``/v1/chat/completions``, ``/v1/responses``) both end here, so a generation is queued, limited and
cancelled the same way whichever door it came through.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import Request
from opentelemetry.trace import SpanKind

from api.http.schemas import CancelResult, GenerationRequest
from tokenfan.contract.errors import Conflict, IdempotencyKeyReused, PayloadTooLarge, RateLimited
from tokenfan.contract.events import EventType, GenerationStatus, encode_body, event_body
from tokenfan.contract.ids import new_generation_id
from tokenfan.runtime.settings import Settings
from tokenfan.runtime.tracing import TRACE_CONTEXT, inject
from tokenfan.store import (
    AcceptOutcome,
    AcceptResult,
    EventWrite,
    Finish,
    GenerationRecord,
    WriteItem,
    WriteOutcome,
)
from tokenfan.store.jobs import enqueue_generation, hand_over

if TYPE_CHECKING:
    from api.http.app import Services

__all__ = ["admit", "cancel_record", "check_sizes", "services_of"]


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def admit(
    services: Services,
    key_name: str,
    session_id: str,
    body: GenerationRequest,
    idempotency_key: str | None,
    generation_id: str | None = None,
) -> AcceptResult:
    """Accept a generation under the caller's limits, in the order that takes nothing from a refused or
    repeated request: what the body may carry first, then a request its Idempotency-Key has seen before (it
    is answered as it was, taking no allowance and queueing nothing), then the rate limit, then the accept.
    Raises `PayloadTooLarge`, `IdempotencyKeyReused`, `RateLimited` or `Conflict`."""
    check_sizes(services.settings, body)
    replayed = await _replayed(services, session_id, body, idempotency_key)
    if replayed is not None:
        return replayed
    await _check_rate(services, key_name)
    return await _accept(services, session_id, body, idempotency_key, generation_id)


def check_sizes(settings: Settings, body: GenerationRequest) -> None:
    """Limits on what one request may carry. Checked first: a refused request takes nothing."""
    if len(body.messages) > settings.max_messages:
        raise PayloadTooLarge(f"at most {settings.max_messages} messages per request")
    if body.metadata is not None and len(json.dumps(body.metadata)) > settings.max_metadata_bytes:
        raise PayloadTooLarge(f"metadata is limited to {settings.max_metadata_bytes} bytes of JSON")


async def _check_rate(services: Services, key_name: str) -> None:
    limit = services.settings.rate_limit_per_minute
    wait = await services.store.rate_limit(key_name, limit)
    if wait:
        raise RateLimited(f"at most {limit} generations a minute", retry_after=wait)


def _stored_request(body: GenerationRequest) -> dict[str, Any]:
    """The request as the worker reads it (the policy is the API's alone)."""
    return body.model_dump(exclude_none=True, exclude={"policy"})


async def _replayed(
    services: Services, session_id: str, body: GenerationRequest, idempotency_key: str | None
) -> AcceptResult | None:
    """The answer to a request its Idempotency-Key has seen before; None for a new key (or none)."""
    if idempotency_key is None:
        return None
    result = await services.store.replay(
        session_id, idempotency_key, request=_stored_request(body), policy=body.policy
    )
    if result is not None and result.outcome is AcceptOutcome.REUSED:
        raise _reused(idempotency_key, result.generation_id)
    return result


def _reused(idempotency_key: str, generation_id: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"Idempotency-Key {idempotency_key!r} was first sent with another request (it created "
        f"{generation_id}); use a new key for a new request"
    )


async def _accept(
    services: Services,
    session_id: str,
    body: GenerationRequest,
    idempotency_key: str | None,
    generation_id: str | None,
) -> AcceptResult:
    """Record the generation in its session's queue, making sure the head of the queue has a job. Every
    log line of the request names the generation from here on; with tracing on, its trace context travels
    in the stored request."""
    generation_id = generation_id or new_generation_id()
    structlog.contextvars.bind_contextvars(session_id=session_id, generation_id=generation_id)
    request = _stored_request(body)
    started = time.perf_counter()
    with _enqueue_span(services, request):
        result = await _queue(services, session_id, generation_id, body, request, idempotency_key)
    services.metrics.enqueue.observe(time.perf_counter() - started)
    return result


@contextlib.contextmanager
def _enqueue_span(services: Services, request: dict[str, Any]) -> Iterator[None]:
    """With tracing on: a span around accepting and enqueueing, whose context the stored request carries
    (`TRACE_CONTEXT`) for the worker that runs it."""
    if services.tracer is None:
        yield
        return
    with services.tracer.start_as_current_span("tokenfan.enqueue", kind=SpanKind.PRODUCER):
        request[TRACE_CONTEXT] = inject()
        yield


async def _queue(
    services: Services,
    session_id: str,
    generation_id: str,
    body: GenerationRequest,
    request: dict[str, Any],
    idempotency_key: str | None,
) -> AcceptResult:
    # The job first: if this process dies right after accepting, the generation still has a job. A job
    # that finds its generation missing or not yet at the head of its queue does nothing.
    await enqueue_generation(services.queue, session_id, generation_id)
    result = await services.store.accept(
        session_id,
        generation_id,
        request=request,
        model=body.model,
        policy=body.policy,
        idempotency_key=idempotency_key,
    )
    if result.outcome is AcceptOutcome.CONFLICT:
        raise Conflict(f"session is busy with {result.generation_id} and policy is 'reject'")
    if result.outcome is AcceptOutcome.REUSED:  # a concurrent request with the key won the race
        raise _reused(str(idempotency_key), result.generation_id)
    if result.queue_position == 1:
        # Again: the early job may have run before the generation existed. For a duplicate (the same key
        # sent twice at once), the other request's enqueue may be what failed. arq ignores a copy of a job
        # that is still queued or running.
        await enqueue_generation(services.queue, session_id, result.generation_id)
    return result


async def cancel_record(services: Services, record: GenerationRecord) -> CancelResult:
    """Cancel a queued generation at once, or ask the worker running it to stop (status ``cancelling``); a
    finished one is left as it is (``cancelled`` false)."""
    generation_id = record.generation_id
    if record.status.is_terminal:
        status = "cancelled" if record.status is GenerationStatus.CANCELLED else record.status.value
        return CancelResult(generation_id=generation_id, status=status, cancelled=False)
    if record.status is GenerationStatus.QUEUED and await _cancel_queued(services, record):
        return CancelResult(generation_id=generation_id, status="cancelled", cancelled=True)
    found = await services.store.request_cancel(record.session_id, generation_id, "requested")
    if found is not None and found.is_terminal:  # it finished between our read and the request
        return CancelResult(generation_id=generation_id, status=found.value, cancelled=False)
    return CancelResult(generation_id=generation_id, status="cancelling", cancelled=True)


async def _cancel_queued(services: Services, record: GenerationRecord) -> bool:
    """End a generation that has not started, in one step; False when it started meanwhile."""
    body = event_body(
        EventType.GENERATION_CANCELLED,
        session_id=record.session_id,
        generation_id=record.generation_id,
        seq=record.seq + 1,
        reason="requested",
        usage=None,
    )
    item = WriteItem(
        record.session_id,
        record.generation_id,
        record.attempt,
        [EventWrite(record.seq + 1, encode_body(body))],
        Finish(GenerationStatus.CANCELLED),
    )
    (result,) = await services.store.write([item])
    if result.outcome is not WriteOutcome.OK:
        return False
    next_id = result.next_generation_id
    if next_id is not None:
        await hand_over(
            services.queue,
            record.session_id,
            next_id,
            lambda: services.store.is_queued(record.session_id, next_id),
        )
    return True
