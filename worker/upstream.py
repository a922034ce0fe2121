"""The upstream adapter: one OpenAI-compatible streaming chat completion as a sequence of `Update`s.

The official ``openai`` client does the HTTP; this module hands its chunks to `worker.chunks.ChunkReader`
(pure), which makes our updates of them, and maps its exceptions to `UpstreamFailure` (`translate_error`,
pure), so the job above it never sees a third-party type. The client's own retries are off: retrying is
the job's decision, because only it knows whether tokens were already shown to subscribers.

Why the generic request path (``client.post(..., stream=True, stream_cls=AsyncStream[object])``) instead of
``client.chat.completions.create``: the typed path builds a pydantic ``ChatCompletionChunk`` for every token,
which costs about 340 CPU-us per chunk in openai 3.x, ten times everything else a worker does per token. The
generic path is the same client, authentication, request, HTTP status and error translation, with openai's
aiohttp transport (``DefaultAioHttpClient``, a C HTTP parser).

Why the body is decoded here (`SSEDecoder`) rather than by iterating the ``AsyncStream``: at a real token
rate every chunk arrives on its own, and openai's generic SSE path (a byte-by-byte line splitter, an event
object, ``is_mapping`` and ``process_data`` per chunk, four nested async generators) costs about as much as
everything else the worker does per token (bench/worker.py, docs/BENCHMARKS.md). `SSEDecoder` applies the same
rules (CR, LF and CRLF line ends, comments, multi-line data, an event ends at a blank line, ``[DONE]`` ends
the stream, a chunk carrying ``error`` raises ``openai.APIError``) to the raw bytes of the response openai
returned, and transport errors are classified as openai classifies them (timeout, then connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from json.scanner import make_scanner
from typing import Any, cast

import httpx2
import openai

from tokenfan.contract.events import FailureType
from tokenfan.contract.parameters import PASSED_THROUGH
from tokenfan.runtime.settings import Settings
from worker.chunks import ChunkReader, Update

__all__ = [
    "PASSTHROUGH",
    "SSEDecoder",
    "Upstream",
    "UpstreamFailure",
    "loads",
    "translate_error",
    "upstream_body",
]


class UpstreamFailure(Exception):
    """The upstream failed; `retryable` says whether trying again (before any token) may help."""

    def __init__(
        self,
        failure: FailureType,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def to_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.failure.value, "message": self.message}
        if self.status is not None:
            error["status"] = self.status
        return error


class SSEDecoder:
    """Server-sent events from raw bytes, fed as they arrive: the ``data`` of each complete event.

    The rules of openai's decoder (and the SSE spec): lines end with CR, LF or CRLF; a line starting with ``:``
    is a comment; ``data`` lines of one event are joined with LF, one leading space dropped; a blank line
    ends the event. Events without data (only ``event``, ``id`` or ``retry`` fields) are skipped: for a
    chat completion they carry nothing. A line still unterminated when the stream ends is dropped, as
    openai drops it.
    """

    __slots__ = ("_data", "_rest", "_skip_lf")

    def __init__(self) -> None:
        self._rest = b""
        self._data: list[bytes] = []
        self._skip_lf = False  # the last chunk ended with CR: a LF opening the next one belongs to it

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buffer = self._rest + chunk if self._rest else chunk
        if b"\r" in buffer:
            self._skip_lf = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._rest = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data"):
                if line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                elif line == b"data":
                    data.append(b"")
        return events


_scan: Callable[[str, int], tuple[Any, int]] = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def loads(data: bytes) -> Any:
    """``json.loads`` of one event's data, a third of the CPU: the C scanner called directly skips the
    Python layers around it (encoding detection, whitespace regexes). Anything it does not accept as is
    (leading whitespace, an error, extra data) goes to ``json.loads``, which gives the same value or error.
    Bytes that are not UTF-8 become U+FFFD, as the SSE specification decodes a stream (and as openai does)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        return json.loads(text)
    return value


def _stream_error(chunk: dict[str, Any], request: Any) -> openai.APIError:
    """What openai raises for a chunk carrying ``error`` (an error reported inside the stream)."""
    error = chunk.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message=message, request=request, body=chunk["error"])


def _event_updates(event: bytes, reader: ChunkReader, request: Any) -> tuple[list[Update], bool]:
    """The updates one event's data adds, and whether it ends the stream (``[DONE]``: what the reader
    still held back comes out then). Raises ``openai.APIError`` for a chunk carrying ``error``."""
    if event.startswith(b"[DONE]"):
        return reader.flush(), True
    chunk = loads(event)
    if isinstance(chunk, dict) and chunk.get("error"):
        raise _stream_error(chunk, request)
    # Only a \ud escape can decode to a lone surrogate: a byte search spares every other chunk the check.
    return reader.updates(chunk, suspect=b"\\ud" in event or b"\\uD" in event), False


async def _drain(raw: AsyncIterator[bytes]) -> None:
    """After ``[DONE]``: read what is left of the body, briefly, so the connection can be reused (as openai
    does). Nothing that happens here can fail a stream that already completed."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(0.1):
            async for _ in raw:
                pass


def _retry_after(headers: Any) -> float | None:
    raw = headers.get("retry-after") if headers is not None else None
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            return max(0.0, float(raw))
    return None


def translate_error(exc: BaseException) -> UpstreamFailure:
    """Map an ``openai`` exception to the failure a client can act on."""
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamFailure(FailureType.UPSTREAM_TIMEOUT, "the upstream stopped sending", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamFailure(
            FailureType.UPSTREAM_DISCONNECTED, "the connection to the upstream broke", retryable=True
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"upstream answered HTTP {status}: {_error_message(exc)}"
        retry_after = _retry_after(exc.response.headers)
        if status == 429:
            return UpstreamFailure(
                FailureType.RATE_LIMITED, message, status=status, retryable=True, retry_after=retry_after
            )
        if status >= 500 or status == 408:
            return UpstreamFailure(
                FailureType.UPSTREAM_UNAVAILABLE,
                message,
                status=status,
                retryable=True,
                retry_after=retry_after,
            )
        return UpstreamFailure(FailureType.UPSTREAM_REJECTED, message, status=status)
    if isinstance(exc, openai.APIError):
        return UpstreamFailure(FailureType.UPSTREAM_ERROR, f"upstream error: {_error_message(exc)}")
    return UpstreamFailure(FailureType.INTERNAL, f"{type(exc).__name__} while streaming from the upstream")


def _error_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:500]
    return str(exc.message)[:500]


#: Request members passed to the upstream as they are: the contract's list, which the API's schema accepts.
PASSTHROUGH = PASSED_THROUGH


def upstream_body(request: dict[str, Any]) -> dict[str, Any]:
    """The chat.completions body for an accepted request: its model, messages and every parameter the
    contract passes through, always streamed, with the usage report asked for."""
    body = {key: value for key, value in request.items() if key in PASSTHROUGH}
    body.update(model=request["model"], messages=request["messages"], stream=True)
    body["stream_options"] = {"include_usage": True}
    return body


def _http_client() -> Any:
    """openai's aiohttp transport when its extra is installed (a C HTTP parser), else its default."""
    try:
        return openai.DefaultAioHttpClient()
    except RuntimeError:  # pragma: no cover - `openai[aiohttp]` is a declared dependency
        return openai.DefaultAsyncHttpx2Client()


class Upstream:
    """One shared ``AsyncOpenAI`` client (and its connection pool) per worker process."""

    def __init__(self, settings: Settings) -> None:
        self.client = openai.AsyncOpenAI(
            http_client=_http_client(),
            base_url=settings.openai_base_url,
            # Local OpenAI-compatible servers often need no key, but the client insists on one.
            api_key=settings.openai_api_key.reveal() if settings.openai_api_key else "unset",
            max_retries=0,
            timeout=openai.Timeout(
                settings.upstream_read_timeout_seconds,
                connect=settings.upstream_connect_timeout_seconds,
            ),
        )

    async def close(self) -> None:
        await self.client.close()

    async def stream(self, request: dict[str, Any]) -> AsyncGenerator[Update, None]:
        """Yield the updates of one streamed completion. Closing the iterator closes the HTTP request,
        which is how a provider learns to stop generating (and billing)."""
        try:
            stream = await self.client.post(
                "/chat/completions",
                body=upstream_body(request),
                cast_to=object,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
        except Exception as exc:
            raise translate_error(exc) from exc
        response = stream.response
        # The transport's byte stream itself (what openai's own drain reads): one generator layer fewer per
        # chunk than `response.aiter_raw()`, which only counts bytes on top.
        raw = cast(AsyncGenerator[bytes, None], response.stream.__aiter__())  # type: ignore[union-attr]
        decoder, reader = SSEDecoder(), ChunkReader()
        try:
            async for data in raw:
                for event in decoder.feed(data):
                    updates, done = _event_updates(event, reader, response.request)
                    for update in updates:
                        yield update
                    if done:
                        await _drain(raw)
                        return
        except httpx2.TimeoutException as exc:
            raise translate_error(openai.APITimeoutError(request=response.request)) from exc
        except (httpx2.RequestError, ssl.SSLError) as exc:
            raise translate_error(openai.APIConnectionError(request=response.request)) from exc
        except Exception as exc:
            raise translate_error(exc) from exc
        finally:
            await raw.aclose()
            await stream.close()
