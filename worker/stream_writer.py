"""The stream writer: one per worker process, batching the appends of every running generation.

Each running attempt holds a `GenerationStream` and adds pieces to it without waiting. A flusher task takes
whatever is pending in all of them and writes it in one script call per Redis slot (`Store.write`): under
light load every piece is written at once (leading edge, no added latency); under heavy load pieces pile up
while a flush is in flight, so the next flush carries more and Redis commands per token fall.
``flush_window`` optionally spaces flushes out further; ``max_pending_bytes`` cuts a window short.

There is one flusher per Redis node a generation writes to (`FlushLane`, named by `Store.session_node`): one
on a single Redis, one per primary on a cluster. A flush returns only once all it carries has landed, and
the next one waits for it; were the nodes' generations flushed together, a primary that dies would hold up
every generation of the worker until its replica took over (a second or more, Redis's default node timeout
is 15 s), where now it holds up its own.

A failed flush (Redis unreachable, connection dropped mid-command) is retried with the *same* items: the
store skips any event whose seq it already holds, so a retry can never duplicate what subscribers see.
An item that cannot be written at all (a bug: an event that does not encode, text that is not valid
Unicode) fails its own generation with `WriteRefused`, never the flusher: the flusher serves every
generation of the process, and one dead flusher hangs them all.

``merge=False`` (``TOKENFAN_COALESCE=false``) is the naive baseline the benchmarks compare against: one event
per piece, and each event written by its own script call as soon as it arrives, by a task of its generation
(in order: one call in flight per generation), with no batching across generations and no flush window.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Callable
from json.encoder import encode_basestring  # what json.dumps(..., ensure_ascii=False) uses for a str
from typing import Any

import structlog

from tokenfan.contract.errors import ServiceUnavailable, StorageUnavailable
from tokenfan.contract.events import EventType, encode_body, event_body
from tokenfan.contract.offsets import Offset
from tokenfan.runtime.metrics import Metrics
from tokenfan.store import EventWrite, Finish, Store, WriteItem, WriteOutcome, WriteResult
from worker.coalesce import Coalescer, PendingEvent
from worker.metrics import NO_PACE, TokenPace, WorkerMetrics
from worker.retained import SentEvent, SentEvents, TextParts
from worker.traces import AttemptTrace

__all__ = ["Fenced", "FlushLane", "GenerationStream", "StreamWriter", "WriteRefused"]

log = structlog.get_logger("tokenfan.worker.writer")


class Fenced(Exception):
    """This attempt may no longer write: another attempt took the generation over, or it already ended."""


class WriteRefused(Exception):
    """This attempt's events could not be written at all (a bug upstream of the writer): none of the events
    it held reached Redis. The job ends the generation from what Redis holds."""


class GenerationStream:
    """The write handle of one running attempt. Adding never blocks; `finish` waits until durable."""

    def __init__(
        self,
        writer: StreamWriter,
        lane: FlushLane,
        session_id: str,
        generation_id: str,
        attempt: int,
        last_seq: int,
        *,
        pace: TokenPace = NO_PACE,
        trace: AttemptTrace | None = None,
    ):
        self.writer = writer
        self.lane = lane  # the flusher of the node this generation's session is on
        self.pace = pace  # ticked once per token added
        self.trace = trace  # the attempt's spans, when tracing is on
        self.session_id = session_id
        self.generation_id = generation_id
        self.attempt = attempt
        self.next_seq = last_seq + 1
        self.coalescer = Coalescer(max_event_bytes=writer.max_event_bytes, merge=writer.merge)
        self.cancel_requested = ""
        self.fenced = False
        self._last: WriteResult | None = None  # the last write's result that named an entry
        self.text_parts = TextParts()
        self.reasoning_parts = TextParts()
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self._tool_calls_changed = False
        self.pieces = 0
        self.on_cancel: Callable[[], object] | None = None
        self.unwatched_limit: float | None = None  # cancel after this many seconds without a subscriber
        self.unwatched_since: float | None = None
        self._finish: Finish | None = None
        self._finish_sent = False
        self._resend: list[EventWrite] = []
        self._done: asyncio.Future[WriteResult] | None = None
        self._error: BaseException | None = None
        self._writing: asyncio.Task[None] | None = None  # merge=False: this generation's own writer
        self._delta_prefix = _delta_prefix(session_id, generation_id)
        # This attempt's events as written: resent if Redis lost them.
        self._sent = SentEvents(self.next_seq, functools.partial(_plain_delta_body, self._delta_prefix))

    @property
    def has_output(self) -> bool:
        """Whether any delta was produced by this attempt (after that, retrying upstream would duplicate)."""
        return self.pieces > 0

    def add_event(self, event_type: EventType | str, **fields: Any) -> None:
        self._check()
        self.coalescer.add_event(event_type, **fields)
        self.writer.wake(self)

    def add_content(self, text: str) -> None:
        """Once per token, in the connection's callback: `StreamWriter.wake` inlined for the common case."""
        if self._error is not None or self.fenced:
            self._check()
        self.pieces += 1
        if self.pace is not NO_PACE:
            self.pace.tick()
        self.text_parts.append(text)
        coalescer = self.coalescer
        coalescer.add_content(text)
        writer = self.writer
        if writer.merge and coalescer.pending_bytes < writer.max_pending_bytes:
            lane = self.lane
            lane.dirty[self] = None
            if not lane.woken:  # once per flush, not once per token
                lane.woken = True
                lane.wake.set()
        else:
            writer.wake(self)

    def add_reasoning(self, text: str) -> None:
        self._check()
        self.pieces += 1
        self.pace.tick()
        self.reasoning_parts.append(text)
        self.coalescer.add_reasoning(text)
        self.writer.wake(self)

    def add_tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str) -> None:
        self._check()
        self.pieces += 1
        self.pace.tick()
        call = self.tool_calls.setdefault(index, {"index": index, "id": "", "name": "", "arguments": ""})
        if call_id:
            call["id"] = call_id
        if name:
            call["name"] = name
        call["arguments"] += arguments
        self._tool_calls_changed = True
        self.coalescer.add_tool_call(index, call_id=call_id, name=name, arguments=arguments)
        self.writer.wake(self)

    async def finish(self, event_type: EventType, finish: Finish, **fields: Any) -> WriteResult:
        """Append the terminal event and end the generation; returns once Redis holds both."""
        self._check()
        self.coalescer.add_event(event_type, **fields)
        self._finish = finish
        self._done = asyncio.get_running_loop().create_future()
        self.writer.wake(self, urgent=True)
        try:
            return await self._done
        finally:
            self.writer.close_stream(self)

    def request_cancel(self, reason: str) -> None:
        """Called when cancellation is asked for (pub/sub, a write result, or the lease heartbeat)."""
        if not self.cancel_requested:
            self.cancel_requested = reason
            if self.on_cancel is not None:
                self.on_cancel()

    def cancel_with(self, cancel: Callable[[], object]) -> None:
        """What stops this attempt's work from now on. A cancellation, fencing or writer failure that came
        before it was set is acted on at once: only the first request is recorded, so nothing else would
        ever look at it again."""
        self.on_cancel = cancel
        if self.cancel_requested or self.fenced or self._error is not None:
            cancel()

    def text(self) -> str:
        return self.text_parts.text()

    def reasoning(self) -> str:
        return self.reasoning_parts.text()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self.fenced:
            raise Fenced(f"attempt {self.attempt} of {self.generation_id} was fenced")

    # --- called by the writer

    def _take(self, *, one: bool = False) -> WriteItem | None:
        """What to write next: everything pending, or only the oldest event (``one``). The finish rides
        with the last event."""
        if one and self._resend:
            return self._item([self._resend.pop(0)], None)
        events, self._resend = self._resend, []
        if one:
            first = self.coalescer.pop_first()
            pending = [first] if first is not None else []
        else:
            pending = self.coalescer.drain()
        finish = None
        if self._finish is not None and not self._finish_sent and not self.coalescer:
            finish = self._finish
        if not pending and not events and finish is None:
            return None
        fresh = self._encode(pending)
        if finish is not None:
            self._finish_sent = True
        return self._item(events + fresh, finish)

    def _encode(self, pending: list[PendingEvent]) -> list[EventWrite]:
        """Pending events as written: each with the next seq, its body encoded once. They are kept for a
        resend too (`_sent`), a plain delta as its text alone."""
        events = []
        kept: list[SentEvent | str] = []
        prefix = self._delta_prefix
        for event in pending:
            fields = event.fields
            content = fields.get("content")
            if prefix and event.type is EventType.DELTA and len(fields) == 1 and type(content) is str:
                # The common case, encoded without building the body dict.
                body = _plain_delta_body(prefix, self.next_seq, content)
                if event.text == content and not event.reasoning:
                    kept.append(content)
                    events.append(EventWrite(self.next_seq, body, content))
                    self.next_seq += 1
                    continue
            else:
                body = encode_body(
                    event_body(
                        event.type,
                        session_id=self.session_id,
                        generation_id=self.generation_id,
                        seq=self.next_seq,
                        **fields,
                    )
                )
            restarts = 1 if event.type is EventType.GENERATION_RESTARTED else 0
            events.append(EventWrite(self.next_seq, body, event.text, event.reasoning, restarts))
            kept.append((self.next_seq, body, event.text, event.reasoning, restarts))
            self.next_seq += 1
        self._sent.extend(kept)
        return events

    def _item(self, events: list[EventWrite], finish: Finish | None) -> WriteItem:
        tool_calls = ""
        if self._tool_calls_changed:
            tool_calls = json.dumps([self.tool_calls[i] for i in sorted(self.tool_calls)], ensure_ascii=False)
            self._tool_calls_changed = False
        return WriteItem(self.session_id, self.generation_id, self.attempt, events, finish, tool_calls)

    @property
    def last_offset(self) -> Offset | None:
        """The offset of this attempt's newest event in Redis (None before its first write)."""
        return self._last.last_offset if self._last is not None else None

    def _apply(self, item: WriteItem, result: WriteResult) -> None:
        if result.last_id != "0-0":
            self._last = result
        if result.cancel_requested:
            self.request_cancel(result.cancel_requested)
        if result.outcome is WriteOutcome.FENCED:
            self.fenced = True
            self._fail(Fenced(f"attempt {self.attempt} of {self.generation_id} was fenced ({result.status})"))
        elif result.outcome is WriteOutcome.GAP:
            self._rewind(item, result.last_seq)
        elif item.finish is not None and self._done is not None and not self._done.done():
            self._done.set_result(result)

    def _rewind(self, item: WriteItem, stored_seq: int) -> None:
        """Redis holds fewer of this attempt's events than it acknowledged: a failover promoted a replica
        that had not received the last writes (replication is asynchronous). Write them again, with the
        generation's tool calls and, if it was on its way, the finish. Subscribers that saw the lost
        entries learn of it from the broken predecessor chain (4410) and rebuild from a snapshot."""
        lost = [EventWrite._make(event) for event in self._sent.after(stored_seq)]
        if not lost or lost[0].seq != stored_seq + 1:
            self._fail(RuntimeError(f"seq gap writing {self.generation_id}: events before this attempt lost"))
            return
        log.warning(
            "stream_rewound",
            session_id=self.session_id,
            generation_id=self.generation_id,
            job_id=self.generation_id,
            stored_seq=stored_seq,
            lost=len(lost),
        )
        self._resend = lost
        self._tool_calls_changed = bool(self.tool_calls)
        if item.finish is not None:
            self._finish_sent = False
        self.writer.wake(self, urgent=True)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self._done is not None and not self._done.done():
            self._done.set_exception(error)
        if self.on_cancel is not None:
            self.on_cancel()


def _plain_delta_body(prefix: str, seq: int, content: str) -> str:
    """The body of a content-only delta: byte for byte what ``encode_body(event_body(...))`` gives, for a
    ``prefix`` from `_delta_prefix` (which checks that once per generation)."""
    return f'{prefix}{seq},"content":{encode_basestring(content)}}}'


def _delta_prefix(session_id: str, generation_id: str) -> str:
    """The encoded body of a content-only delta up to its seq, or '' when the encoder does not lay such a
    body out as expected (then every event takes the general path)."""
    sample = encode_body(
        event_body(EventType.DELTA, session_id=session_id, generation_id=generation_id, seq=0, content="")
    )
    tail = '"seq":0,"content":""}'
    return sample[: -len(tail) + len('"seq":')] if sample.endswith(tail) else ""


class StreamWriter:
    """Owns the flusher task. `open` a stream per attempt; run `run()` as a task for the process's life."""

    def __init__(
        self,
        store: Store,
        *,
        flush_window: float = 0.0,
        max_pending_bytes: int = 65_536,
        max_event_bytes: int = 16_384,
        merge: bool = True,
        retry_seconds: float = 30.0,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or WorkerMetrics(Metrics("worker", enabled=False))
        self.flush_window = flush_window
        self.max_pending_bytes = max_pending_bytes
        self.max_event_bytes = max_event_bytes
        self.merge = merge
        self.retry_seconds = retry_seconds
        self.streams: dict[str, GenerationStream] = {}
        self.lanes: dict[str, FlushLane] = {}  # by node name; a node's lane stays once it had a generation
        self._ended: asyncio.Future[None] | None = None  # while `run` runs: a lane's task ended (a bug)

    def open(
        self,
        session_id: str,
        generation_id: str,
        attempt: int,
        last_seq: int,
        trace: AttemptTrace | None = None,
    ) -> GenerationStream:
        pace = self.metrics.pace()
        lane = self._lane(self.store.session_node(session_id))
        stream = GenerationStream(
            self, lane, session_id, generation_id, attempt, last_seq, pace=pace, trace=trace
        )
        self.streams[generation_id] = stream
        return stream

    def close_stream(self, stream: GenerationStream) -> None:
        if self.streams.get(stream.generation_id) is stream:
            del self.streams[stream.generation_id]

    def wake(self, stream: GenerationStream, *, urgent: bool = False) -> None:
        if not self.merge:
            if stream._writing is None:
                stream._writing = asyncio.get_running_loop().create_task(self._write_alone(stream))
            return
        lane = stream.lane
        lane.dirty[stream] = None
        if not lane.woken:  # once per flush, not once per token
            lane.woken = True
            lane.wake.set()
        if urgent or stream.coalescer.pending_bytes >= self.max_pending_bytes:
            lane.urgent.set()

    async def run(self) -> None:
        """Flush until cancelled: each lane's task starts with the lane (here those opened before, in `open`
        the later ones). Ends, raising, only if a lane's task does: a bug, since a flush deals with its own
        failures, and a worker whose writes stopped must not go on taking jobs."""
        self._ended = asyncio.get_running_loop().create_future()
        for lane in self.lanes.values():
            self._start(lane)
        try:
            await self._ended
        finally:
            self._ended = None
            tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for lane in self.lanes.values():
                lane.task = None

    def _lane(self, name: str) -> FlushLane:
        lane = self.lanes.get(name)
        if lane is None:
            lane = self.lanes[name] = FlushLane(self, name)
            if self._ended is not None:
                self._start(lane)
        return lane

    def _start(self, lane: FlushLane) -> None:
        assert self._ended is not None
        # The loop `run` runs on: `open` may be called outside of it (while it is not running).
        lane.task = self._ended.get_loop().create_task(lane.run(), name=f"stream-writer {lane.name}")
        lane.task.add_done_callback(self._lane_ended)

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
        ended = self._ended
        if ended is None or ended.done() or task.cancelled():
            return
        ended.set_exception(task.exception() or RuntimeError(f"{task.get_name()} ended"))

    async def _write_alone(self, stream: GenerationStream) -> None:
        """merge=False: write this generation's events one script call each, oldest first, until none is
        left (the next piece starts a new task)."""
        try:
            while not stream.fenced and stream._error is None:
                item = stream._take(one=True)
                if item is None:
                    return
                await self._flush([(stream, item)])
        finally:
            stream._writing = None

    async def _flush(self, batch: list[tuple[GenerationStream, WriteItem]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_seconds
        backoff = 0.02
        while True:
            try:
                started = time.perf_counter_ns()
                results = await self.store.write([item for _, item in batch])
                self._observe(batch, started, time.perf_counter_ns())
                break
            except StorageUnavailable as exc:
                if loop.time() + backoff > deadline:
                    log.error(
                        "write_abandoned",
                        error=repr(exc.__cause__),
                        generations=len(batch),
                        node=batch[0][0].lane.name,
                    )
                    for stream, _ in batch:
                        stream._fail(ServiceUnavailable(f"Redis unreachable for {self.retry_seconds:.0f}s"))
                    return
                log.warning(
                    "write_retry", error=repr(exc.__cause__), backoff_s=backoff, node=batch[0][0].lane.name
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception as exc:  # refused before it was sent: none of it reached Redis
                await self._isolate(batch, exc)
                return
        for (stream, item), result in zip(batch, results, strict=True):
            stream._apply(item, result)

    def _observe(self, batch: list[tuple[GenerationStream, WriteItem]], started: int, ended: int) -> None:
        """A write succeeded: its latency and size, and a span in each traced generation it carried."""
        if self.metrics.enabled:
            self.metrics.flushed([item for _, item in batch], (ended - started) / 1e9)
        traced = [(stream.trace, item) for stream, item in batch if stream.trace is not None]
        if traced:
            offset = time.time_ns() - ended  # spans take wall-clock times; the latency, a monotonic clock
            for trace, item in traced:
                trace.wrote(started + offset, ended + offset, len(item.events), final=item.finish is not None)

    async def _isolate(self, batch: list[tuple[GenerationStream, WriteItem]], exc: Exception) -> None:
        """A batch the client refused to send: write its items one by one, so that only the generation
        whose item is refused fails."""
        if len(batch) == 1:
            _refuse(batch[0][0], exc)
            return
        for one in batch:
            await self._flush([one])


def _refuse(stream: GenerationStream, exc: Exception) -> None:
    log.error(
        "write_refused",
        session_id=stream.session_id,
        generation_id=stream.generation_id,
        job_id=stream.generation_id,
        error=repr(exc)[:300],  # it may quote the whole event: enough to find the bug
    )
    stream._fail(WriteRefused(f"{stream.generation_id}'s events could not be written ({type(exc).__name__})"))


class FlushLane:
    """The generations of one Redis node (`Store.session_node`), and the task that flushes them: each flush
    takes whatever they hold pending and writes it at once, and the next waits for it to land. A
    generation keeps its lane for its life: after a failover its writes reach the promoted replica through
    the same lane (`Store.write` routes each flush by the slot map of the moment)."""

    def __init__(self, writer: StreamWriter, name: str) -> None:
        self.writer = writer
        self.name = name
        self.dirty: dict[GenerationStream, None] = {}  # an ordered set: flush in arrival order
        self.wake = asyncio.Event()
        self.woken = False  # whether `wake` is set: checked per token, cheaper than asking the event
        self.urgent = asyncio.Event()
        self.last_flush = -1e9
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = self.writer
        while True:
            await self.wake.wait()
            delay = self.last_flush + writer.flush_window - loop.time()
            if delay > 0 and not self.urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.urgent.wait(), delay)
            self.wake.clear()
            self.woken = False
            self.urgent.clear()
            batch = self.collect()
            if batch:
                self.last_flush = loop.time()
                await writer._flush(batch)

    def collect(self) -> list[tuple[GenerationStream, WriteItem]]:
        dirty, self.dirty = self.dirty, {}
        batch = []
        for stream in dirty:
            if stream.fenced or stream._error is not None:
                continue
            try:
                item = stream._take()
            except Exception as exc:  # an event that does not encode: its generation's failure alone
                _refuse(stream, exc)
                continue
            if item is not None:
                batch.append((stream, item))
        return batch
