"""The generate job: one attempt of one generation, from upstream request to terminal event.

Orchestration only: the store decides who may run (`Store.start`), the upstream adapter speaks OpenAI, the
stream writer appends, hooks add custom events, `worker.usage` estimates what the upstream did not report.
Whatever happens, the generation ends in exactly one terminal event. The exceptions are a shutdown of
this process and Redis being unreachable: then its lease is given back, or left to expire, and another
worker restarts it, and subscribers see ``generation.restarted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry.trace import Tracer

from tokenfan.contract.errors import ServiceUnavailable
from tokenfan.contract.events import EventType, FailureType, GenerationStatus, text_sha256
from tokenfan.store import Finish, StartOutcome, StartResult, Store
from tokenfan.store.jobs import Retry
from worker.chunks import ContentPiece, FinishPiece, ReasoningPiece, ToolCallPiece, Update, UsagePiece
from worker.hooks import HookContext, Hooks, load_hooks
from worker.stream_writer import Fenced, GenerationStream, StreamWriter, WriteRefused
from worker.traces import attempt_trace
from worker.upstream import Upstream, UpstreamFailure
from worker.usage import estimate_usage

__all__ = ["GenerationJob", "Outcome", "RetryPolicy"]

log = structlog.get_logger("tokenfan.worker.generate")

Enqueue = Callable[[str, str], Awaitable[None]]
Claim = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Upstream retries, only before the first token (after it, a retry would repeat shown text)."""

    max_retries: int = 3
    budget_seconds: float = 30.0
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return min(self.max_delay, self.base_delay * 2.0**retry) * (0.5 + random.random() / 2)


@dataclass(slots=True)
class Outcome:
    """How an attempt ended, before it is written."""

    status: GenerationStatus
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: Runs of a job whose generation does not exist (yet) before it gives up.
_MISSING_TRIES = 4


def _failed(failure: FailureType, message: str) -> Outcome:
    return Outcome(GenerationStatus.FAILED, error={"type": failure.value, "message": message})


def _cancelled(stream: GenerationStream) -> Outcome:
    return Outcome(GenerationStatus.CANCELLED, extra={"reason": stream.cancel_requested or "requested"})


async def _nothing(generation_id: str) -> None:
    return None


class GenerationJob:
    """Runs generations for the arq worker. One instance per worker process, shared by all jobs."""

    def __init__(
        self,
        store: Store,
        writer: StreamWriter,
        upstream: Upstream,
        enqueue: Enqueue,
        *,
        retry: RetryPolicy | None = None,
        timeout_seconds: float = 3_600,
        hooks: Hooks | None = None,
        on_claimed: Claim = _nothing,
        tracer: Tracer | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.metrics = writer.metrics  # the process's: the writer times each token
        self.tracer = tracer
        self.upstream = upstream
        self.enqueue = enqueue
        self.retry = retry or RetryPolicy()
        self.timeout_seconds = timeout_seconds
        self.hooks = hooks or load_hooks(None)
        self.on_claimed = on_claimed

    async def __call__(
        self, session_id: str, generation_id: str, job_try: int = 1, enqueued_at: float | None = None
    ) -> None:
        """Run the job of one generation; `enqueued_at` (unix seconds) is when the job entered the queue."""
        structlog.contextvars.bind_contextvars(
            session_id=session_id, generation_id=generation_id, job_id=generation_id
        )
        start = await self.store.start(session_id, generation_id)
        if start.outcome is StartOutcome.MISSING and job_try < _MISSING_TRIES:
            # The API enqueues before it accepts: give the acceptance a moment to land.
            log.info("job_deferred", reason=start.outcome.value, defer_s=0.5)
            raise Retry(defer=0.5)
        if start.outcome in (StartOutcome.TERMINAL, StartOutcome.MISSING, StartOutcome.WAITING):
            log.info("job_skipped", reason=start.outcome.value)
            return
        if start.outcome is StartOutcome.BUSY:
            # A live worker holds the lease (or a dead one's lease has not run out yet): look again later.
            defer = max(0.05, start.busy_for_ms / 1000)
            log.info("job_deferred", reason=start.outcome.value, defer_s=defer)
            raise Retry(defer=defer)
        await self.on_claimed(generation_id)
        self.metrics.attempt_started(
            restarted=start.outcome is StartOutcome.RESTARTED, enqueued_at=enqueued_at
        )
        with attempt_trace(self.tracer, session_id, generation_id, start, enqueued_at) as trace:
            stream = self.writer.open(session_id, generation_id, start.attempt, start.last_seq, trace)
            await self._take(session_id, generation_id, start, stream)

    async def _take(
        self, session_id: str, generation_id: str, start: StartResult, stream: GenerationStream
    ) -> None:
        """Run the attempt `start` began, to its terminal event (or hand it back)."""
        log.info("generation_started", attempt=start.attempt, outcome=start.outcome.value)
        try:
            request = start.request or {}
            context = HookContext(stream, request)
            outcome = await self._run(stream, start, context)
            await self._finish(stream, request, context, outcome)
        except Fenced as exc:
            # Usually another attempt took over. But a failover can also lose this attempt's start (the
            # promoted replica had not received it): then nobody runs the generation. Run the job again
            # later, and `start` decides: done (terminal), another worker's (busy), or a clean restart.
            log.warning("attempt_fenced", attempt=start.attempt)
            raise Retry(defer=self.store.lease_ms / 1000) from exc
        except WriteRefused:
            await self._end_unwritten(stream)
        except ServiceUnavailable as exc:
            # Redis is away; arq retries the job, and by then the lease has run out: a clean restart.
            log.error("redis_unavailable", error=exc.message)
            raise Retry(defer=self.store.lease_ms / 1000) from exc
        except asyncio.CancelledError:
            # Shutdown: give the generation back at once rather than after the lease runs out.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release_lease(session_id, generation_id, start.attempt))
            raise
        finally:
            self.writer.close_stream(stream)

    async def _end_unwritten(self, refused: GenerationStream) -> None:
        """The writer could not write this attempt's events (a bug, logged as ``write_refused``): end the
        generation as failed, after what Redis holds, so that its session goes on."""
        record = await self.store.generation(refused.generation_id)
        if record is None or record.status.is_terminal or record.attempt != refused.attempt:
            return
        stream = self.writer.open(refused.session_id, refused.generation_id, refused.attempt, record.seq)
        error = _failed(FailureType.INTERNAL, "internal error (its output could not be stored)").error
        finish = Finish(GenerationStatus.FAILED, error=error)
        result = await stream.finish(EventType.GENERATION_FAILED, finish, error=error, usage=None)
        log.info("generation_finished", status="failed", offset=str(result.last_offset))
        if result.next_generation_id is not None:
            await self.enqueue(refused.session_id, result.next_generation_id)

    async def _run(self, stream: GenerationStream, start: StartResult, context: HookContext) -> Outcome:
        if start.outcome is StartOutcome.EXHAUSTED or start.request is None:
            return _failed(
                FailureType.WORKER_LOST, f"gave up after {start.attempt - 1} attempts: their workers stopped"
            )
        request = start.request
        if start.outcome is StartOutcome.RESTARTED:
            stream.add_event(EventType.GENERATION_RESTARTED, attempt=start.attempt)
        started: dict[str, Any] = {"attempt": start.attempt, "model": request["model"]}
        if request.get("metadata") is not None:
            started["metadata"] = request["metadata"]
        stream.add_event(EventType.GENERATION_STARTED, **started)
        if start.cancel_requested:  # cancelled (or interrupted) while it waited in the queue
            return Outcome(GenerationStatus.CANCELLED, extra={"reason": start.cancel_requested})
        stream.unwatched_limit = request.get("cancel_when_unwatched_seconds")
        return await self._attempt(stream, request, context)

    async def _attempt(
        self, stream: GenerationStream, request: dict[str, Any], context: HookContext
    ) -> Outcome:
        work = asyncio.create_task(self._work(stream, request, context))
        # A cancellation heard before this point (while the started event was written) acts at once.
        stream.cancel_with(work.cancel)
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await work
        except TimeoutError:
            return _failed(FailureType.TIMEOUT, f"ran longer than {self.timeout_seconds:.0f}s")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves, not just the upstream read
            stream._check()  # a writer failure or fencing surfaces here
            log.info("generation_cancelled", reason=stream.cancel_requested)
            return _cancelled(stream)
        except Exception as exc:  # a bug: report it on the stream instead of leaving it hanging
            if isinstance(exc, Fenced | ServiceUnavailable):
                raise
            log.exception("generation_crashed")
            return _failed(FailureType.INTERNAL, f"internal error ({type(exc).__name__})")

    async def _work(self, stream: GenerationStream, request: dict[str, Any], context: HookContext) -> Outcome:
        """The hook's ``on_start``, then the upstream: one task, so that a cancellation stops either."""
        try:
            await self.hooks.on_start(context)
        except Exception as exc:
            log.exception("hook_failed", hook="on_start")
            return _failed(FailureType.INTERNAL, f"worker hook on_start failed ({type(exc).__name__})")
        if stream.cancel_requested:  # a hook that swallowed its cancellation must not start the upstream
            return _cancelled(stream)
        return await self._consume(stream, request)

    async def _consume(self, stream: GenerationStream, request: dict[str, Any]) -> Outcome:
        retries = 0
        deadline = asyncio.get_running_loop().time() + self.retry.budget_seconds
        while True:
            try:
                return await self._stream_once(stream, request)
            except UpstreamFailure as failure:
                delay = self.retry.delay(retries, failure.retry_after)
                if (
                    failure.retryable
                    and not stream.has_output
                    and retries < self.retry.max_retries
                    and asyncio.get_running_loop().time() + delay < deadline
                ):
                    log.warning(
                        "upstream_retry", failure=failure.failure.value, status=failure.status, delay_s=delay
                    )
                    self.metrics.retries.labels(failure.failure.value).inc()
                    retries += 1
                    await asyncio.sleep(delay)
                    continue
                log.warning("upstream_failed", failure=failure.failure.value, status=failure.status)
                return Outcome(GenerationStatus.FAILED, error=failure.to_error())

    async def _stream_once(self, stream: GenerationStream, request: dict[str, Any]) -> Outcome:
        if stream.trace is None:
            return await self._read_upstream(stream, request)
        with stream.trace.upstream(str(request.get("model", ""))):
            return await self._read_upstream(stream, request)

    async def _read_upstream(self, stream: GenerationStream, request: dict[str, Any]) -> Outcome:
        received = _Received(stream)
        await self.upstream.stream(request, received)
        if received.finish_reason is None:
            raise UpstreamFailure(
                FailureType.UPSTREAM_DISCONNECTED, "the upstream stream ended without finishing"
            )
        return Outcome(GenerationStatus.COMPLETED, finish_reason=received.finish_reason, usage=received.usage)

    async def _finish(
        self, stream: GenerationStream, request: dict[str, Any], context: HookContext, outcome: Outcome
    ) -> None:
        try:
            await self.hooks.before_finish(context, outcome.status.value)
        except Exception:
            log.exception("hook_failed", hook="before_finish")
        if outcome.usage is None and request:
            # In a thread: tokenizing a long text takes milliseconds that every other generation would wait.
            outcome.usage = await asyncio.to_thread(
                estimate_usage,
                str(request.get("model", "")),
                request.get("messages", ()),
                completion=stream.text(),
                reasoning=stream.reasoning(),
                tool_arguments=[call["arguments"] for call in stream.tool_calls.values()],
            )
        fields: dict[str, Any] = dict(outcome.extra)
        if outcome.status is GenerationStatus.COMPLETED:
            event_type = EventType.GENERATION_COMPLETED
            fields.update(finish_reason=outcome.finish_reason, usage=outcome.usage, **_proof(stream))
        elif outcome.status is GenerationStatus.CANCELLED:
            event_type = EventType.GENERATION_CANCELLED
            fields["usage"] = outcome.usage
        else:
            event_type = EventType.GENERATION_FAILED
            fields.update(error=outcome.error, usage=outcome.usage)
        finish = Finish(outcome.status, outcome.finish_reason, outcome.usage, outcome.error)
        result = await stream.finish(event_type, finish, **fields)
        log.info("generation_finished", status=outcome.status.value, offset=str(result.last_offset))
        self.metrics.finished_as(outcome.status, outcome.finish_reason, outcome.extra, outcome.error)
        if stream.trace is not None and outcome.error is not None:
            stream.trace.failed(str(outcome.error.get("type", "error")))
        if result.next_generation_id is not None:
            await self.enqueue(stream.session_id, result.next_generation_id)


class _Received:
    """Takes the updates of one upstream stream as they arrive (in the transport's callback, per chunk):
    pieces go to the generation's stream, the finish reason and usage are kept for its end."""

    __slots__ = ("finish_reason", "stream", "text", "usage")

    def __init__(self, stream: GenerationStream) -> None:
        self.stream = stream
        self.text = stream.add_content  # once per token: no call of ours in between
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def updates(self, updates: list[Update]) -> None:
        stream = self.stream
        for update in updates:
            match update:
                case ContentPiece(text):
                    stream.add_content(text)
                case ReasoningPiece(text):
                    stream.add_reasoning(text)
                case ToolCallPiece(index, call_id, name, arguments):
                    stream.add_tool_call(index, call_id, name, arguments)
                case FinishPiece(reason):
                    self.finish_reason = reason
                case UsagePiece(report):
                    self.usage = report  # some providers repeat it on every chunk: the last one wins


def _proof(stream: GenerationStream) -> dict[str, Any]:
    """What ``generation.completed`` states of everything the attempt produced, so that a client can verify
    what it assembled: the text's and the reasoning's length and SHA-256, and a digest of each tool call."""
    text, reasoning = stream.text(), stream.reasoning()
    proof: dict[str, Any] = {"length": len(text), "sha256": text_sha256(text)}
    proof.update(reasoning_length=len(reasoning), reasoning_sha256=text_sha256(reasoning))
    if stream.tool_calls:
        proof["tool_calls"] = [_digest(stream.tool_calls[i]) for i in sorted(stream.tool_calls)]
    return proof


def _digest(call: dict[str, Any]) -> dict[str, Any]:
    """What ``generation.completed`` says of a tool call, so a client can verify what it assembled."""
    arguments: str = call["arguments"]
    return {
        "index": call["index"],
        "id": call["id"] or None,
        "name": call["name"] or None,
        "length": len(arguments),
        "sha256": text_sha256(arguments),
    }
