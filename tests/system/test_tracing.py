"""A generation's trace, from the API request through the queue to the worker's upstream call and its
writes, recorded with the OpenTelemetry SDK's in-memory exporter.

The API app and the worker's job run in this process (each given the test's tracer, as `tracer_from_env`
gives a process its own), against a real Redis (a database of its own, so that no other worker takes the
job) and the simulator as a real process. The trace context travels as it does between processes: in the
stored request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from arq.jobs import Job
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.support.requests import SIMULATOR, new_session_id, user_message
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.cli.processes import ChildProcess
from tokenfan.contract.keys import ARQ_QUEUE
from tokenfan.runtime.settings import Settings
from tokenfan.runtime.tracing import tracer_from_env, tracing_requested
from tokenfan.store import Store
from tokenfan.store.jobs import create_queue, deserialize_job
from worker.generate import GenerationJob
from worker.stream_writer import StreamWriter
from worker.upstream import Upstream

#: A trace the caller of the API already started (W3C traceparent): the generation's spans continue it.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    args = ["--port", "0", "--tokens-per-second", "0", "--reply-tokens", str(SIMULATOR.reply_tokens)]
    child = ChildProcess("simulator", args)
    try:
        yield child.start().wait_ready()
    finally:
        child.stop()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def settings(redis_server: EmbeddedRedis, simulator: str) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": redis_server.url.removesuffix("/0") + "/7",  # no other worker polls this queue
            "OPENAI_BASE_URL": simulator + "/v1",
            "TOKENFAN_INSECURE_DEV_MODE": "true",
        }
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    store = Store.from_settings(settings)
    yield store
    await store.close()


async def post_generation(settings: Settings, provider: TracerProvider, session_id: str) -> str:
    from api.http.app import create_app

    app = create_app(settings, tracer=provider.get_tracer("api"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            response = await client.post(
                f"/v1/sessions/{session_id}/generations",
                json=user_message("trace me"),
                headers={"traceparent": CALLER},
            )
    assert response.status_code == 202, response.text
    generation_id: str = response.json()["generation_id"]
    return generation_id


async def run_job(
    settings: Settings, store: Store, provider: TracerProvider, session_id: str, generation_id: str
) -> None:
    """The worker's side: the job as arq would run it, with the job's enqueue time from arq itself."""
    queue = await create_queue(settings.queue_url)
    writer = StreamWriter(store)
    flusher = asyncio.create_task(writer.run())
    upstream = Upstream(settings)
    try:
        info = await Job(generation_id, queue, _queue_name=ARQ_QUEUE, _deserializer=deserialize_job).info()
        assert info is not None
        job = GenerationJob(store, writer, upstream, _no_hand_over, tracer=provider.get_tracer("worker"))
        await job(session_id, generation_id, enqueued_at=info.enqueue_time.timestamp())
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await upstream.close()
        await queue.aclose()


async def _no_hand_over(session_id: str, generation_id: str) -> None:
    return None


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [span for span in spans if span.name == name]
    return span


def attribute(span: ReadableSpan, name: str) -> object:
    return (span.attributes or {}).get(name)


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_generations_trace_spans_the_request_the_queue_the_upstream_call_and_the_writes(
    settings: Settings, store: Store, exporter: InMemorySpanExporter
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    session_id = new_session_id()
    generation_id = await post_generation(settings, provider, session_id)
    await run_job(settings, store, provider, session_id, generation_id)
    spans = list(exporter.get_finished_spans())

    assert {span.context.trace_id for span in spans} == {int(CALLER_TRACE, 16)}, "one trace, the caller's"
    request = only(spans, "POST /v1/sessions/{session_id}/generations")
    assert request.kind is SpanKind.SERVER
    assert attribute(request, "http.route") == "/v1/sessions/{session_id}/generations"
    enqueue = only(spans, "tokenfan.enqueue")
    assert (enqueue.kind, parent_of(enqueue)) == (SpanKind.PRODUCER, request.context.span_id)
    queued = only(spans, "tokenfan.queue")
    generation = only(spans, "tokenfan.generation")
    for span in (queued, generation):
        assert parent_of(span) == enqueue.context.span_id
    assert generation.kind is SpanKind.CONSUMER
    assert attribute(generation, "tokenfan.generation_id") == generation_id
    assert (queued.start_time or 0) <= (queued.end_time or 0) <= (generation.start_time or 0)
    upstream = only(spans, "tokenfan.upstream")
    assert (upstream.kind, parent_of(upstream)) == (SpanKind.CLIENT, generation.context.span_id)
    writes = [span for span in spans if span.name == "tokenfan.write"]
    assert writes, "each write to Redis that carried the generation's events"
    assert all(parent_of(span) == generation.context.span_id for span in writes)
    assert attribute(writes[-1], "tokenfan.final") is True
    assert attribute(generation, "tokenfan.writes") == len(writes)


def test_tracing_is_off_unless_the_otel_variables_ask_for_it() -> None:
    assert not tracing_requested({})
    assert tracer_from_env("worker", {}) is None
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})
    assert tracer_from_env("worker", {"OTEL_TRACES_EXPORTER": "console"}) is not None
    with pytest.raises(ValueError, match="no installed exporter"):
        tracer_from_env("worker", {"OTEL_TRACES_EXPORTER": "no-such-exporter"})
