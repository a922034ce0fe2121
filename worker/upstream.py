"""The upstream adapter: one OpenAI-compatible streaming chat completion, handed on as `Update`s.

The official ``openai`` client does the HTTP; this module hands its chunks to `worker.chunks.ChunkReader`
(pure), which makes our updates of them, and maps its exceptions to `UpstreamFailure` (`translate_error`,
pure), so the job above it never sees a third-party type. The client's own retries are off: retrying is
the job's decision, because only it knows whether tokens were already shown to subscribers.

Why the generic request path (``client.post(..., stream=True, stream_cls=AsyncStream[object])``) instead of
``client.chat.completions.create``: the typed path builds a pydantic ``ChatCompletionChunk`` for every token,
which costs about 340 CPU-us per chunk in openai 3.x, ten times everything else a worker does per token. The
generic path is the same client, authentication, request, HTTP status and error translation.

Why the body is decoded here (`SSEDecoder`) rather than by iterating the ``AsyncStream``: at a real token
rate every chunk arrives on its own, and openai's generic SSE path (a byte-by-byte line splitter, an event
object, ``is_mapping`` and ``process_data`` per chunk, four nested async generators) costs about as much as
everything else the worker does per token (bench/worker.py, docs/BENCHMARKS.md). `SSEDecoder` applies the same
rules (CR, LF and CRLF line ends, comments, multi-line data, an event ends at a blank line, ``[DONE]`` ends
the stream, a chunk carrying ``error`` raises ``openai.APIError``) to the raw bytes of the response openai
returned, and transport errors are classified as openai classifies them (timeout, then connection). The
common piece (one whole event holding one chunk) is read in one pass (`_Reading.feed`), its JSON scanned
past the members every chunk of the stream repeats (`_envelope`); the general path reads everything else.

Why updates are handed to a callback (`Taker`) rather than yielded: the client runs on the worker's own
transport (`worker.transport`), which delivers each piece of a body inside the connection's callback, so a
token goes from the socket to the generation's stream with no task woken and no iterator climbed. With any
other transport (openai's aiohttp one, used when a proxy is configured) the body is iterated, and the same
callback takes the same updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from json.scanner import make_scanner
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httpx2
import openai

from tokenfan.contract.events import FailureType
from tokenfan.contract.parameters import PASSED_THROUGH
from tokenfan.runtime.settings import Settings
from worker.chunks import ChunkReader, Update
from worker.transport import BODY, Body, StreamingTransport

__all__ = [
    "PASSTHROUGH",
    "SSEDecoder",
    "Taker",
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

    __slots__ = ("_data", "_rest", "_skip_lf", "holding")

    def __init__(self) -> None:
        self.holding = False  # part of an event is held: the next bytes continue it
        self._rest = b""
        self._data: list[bytes] = []
        self._skip_lf = False  # the last chunk ended with CR: a LF opening the next one belongs to it

    def feed(self, chunk: bytes) -> list[bytes]:
        if (
            not self._rest
            and not self._skip_lf
            and not self._data
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
        ):  # the common read at a model's pace: exactly one whole event, one data line
            return [chunk[6:-2]]
        return self._feed(chunk)

    def _feed(self, chunk: bytes) -> list[bytes]:
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
        self.holding = bool(self._rest or data or self._skip_lf)
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


def _event_updates(event: bytes, reader: ChunkReader, request: Any) -> tuple[list[Update] | str, bool]:
    """What one event's data adds, and whether it ends the stream (``[DONE]``: what the reader still held
    back comes out then): the text of a chunk that carries only text (`ChunkReader.content`, the hot path),
    else its updates. Raises ``openai.APIError`` for a chunk carrying ``error``."""
    if event.startswith(b"[DONE]"):
        return reader.flush(), True
    chunk = loads(event)
    if type(chunk) is dict and chunk.get("error"):
        raise _stream_error(chunk, request)
    # Only a \ud escape can decode to a lone surrogate: a byte search spares every other chunk the check.
    if b"\\ud" in event or b"\\uD" in event:
        return reader.updates(chunk, suspect=True), False
    text = reader.content(chunk)
    return (reader.updates(chunk) if text is None else text), False


#: How many times one stream may learn its chunks' envelope (`_envelope`): once, unless it changes.
_ENVELOPE_LEARNINGS = 3
_CHOICES = '"choices":'


def _envelope(line: str) -> str:
    """The start of the data line `line` up to its chunk's top-level ``"choices":``, when the members before
    it carry neither usage nor an error ('' otherwise). A chunk whose line starts with the same text has the
    same members before its choices: JSON is read left to right, and the text ends at the colon, so what
    follows cannot change how it reads. The first ``"choices":`` is that member only if its quote opens a key
    (after ``{`` or ``,``: not the escaped end of another key, ``"a\\"choices":``) and the text up to it, closed
    with a value, is a whole object (a key inside a string or a nested object would leave it open)."""
    at = line.find(_CHOICES)
    if at < 0 or line[at - 1] not in "{,":  # after a backslash, the quote could close a key: 'a"choices'
        return ""
    prefix = line[: at + len(_CHOICES)]
    closed = prefix[6:] + "0}"
    try:
        members, end = _scan(closed, 0)
    except (StopIteration, ValueError):
        return ""
    if end != len(closed) or type(members) is not dict or "usage" in members or "error" in members:
        return ""
    return prefix


def _plain_members(text: str) -> bool:
    """Whether `text` (``{`` and the members after a chunk's choices, then its data line's end) is a
    non-empty object, with no second ``choices``, no usage and no error: what `ChunkReader.content` allows."""
    members, end = _scan(text, 0)
    return (
        end == len(text) - 2
        and bool(members)
        and "choices" not in members
        and type(members.get("usage")) is not dict
        and not members.get("error")
    )


class _Refused(Exception):
    """What the taker of the updates raised (the writer's fencing or failure): it passes through as is."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Taker(Protocol):
    """Where a stream's updates go, in order, as they arrive."""

    def text(self, text: str) -> None:
        """Content text, from a chunk that carried nothing else (nearly every chunk)."""

    def updates(self, updates: list[Update]) -> None:
        """The updates of any other chunk."""


def _reading(take: Taker, request: Any) -> Callable[[bytes], bool]:
    """What each piece of the body goes through, in order: SSE events, chunks, updates, `take`. Returns True
    once ``[DONE]`` is read."""
    return _Reading(take, request).feed


class _Reading:
    """One stream's read (`_reading`)."""

    __slots__ = (
        "_choices_content",
        "_content",
        "_decoder",
        "_learning",
        "_reader",
        "_request",
        "_text",
        "_updates",
        "envelope",
    )

    def __init__(self, take: Taker, request: Any) -> None:
        self._decoder, self._reader, self._request = SSEDecoder(), ChunkReader(), request
        self._text, self._updates = take.text, take.updates
        self._content, self._choices_content = self._reader.content, self._reader.choices_content
        # The members before ``"choices":`` that this stream's chunks repeat byte for byte (id, object,
        # created, model...), as sent: learned from one chunk, and not parsed again in the next (`_envelope`).
        self.envelope = ""
        self._learning = _ENVELOPE_LEARNINGS

    def feed(self, data: bytes) -> bool:
        # The common piece at a model's pace, read in one pass: one whole event of one data line holding a
        # chunk with no escaped surrogate, decoded whole and scanned in place (what `SSEDecoder.feed`,
        # `loads` and `_event_updates` do, without their slices and layers; tests/worker/test_sse_decoder.py
        # holds them to the same result). Its checks run on the decoded text: a str's searches cost a
        # third of the same searches on bytes. Whatever this path does not take, the general one reads.
        if self._decoder.holding:
            return self._events(data)
        try:
            decoded = data.decode()
        except UnicodeDecodeError:
            return self._events(data)
        if (
            not decoded.startswith("data: {")
            or decoded.find("\n") != len(decoded) - 2
            or decoded[-1] != "\n"
            or "\r" in decoded
            or ("\\" in decoded and ("\\ud" in decoded or "\\uD" in decoded))
        ):
            return self._events(data)
        try:
            added = self._chunk_text(decoded)
        except (StopIteration, ValueError):  # the general path raises what `loads` raises, if anything
            return self._events(data)
        if added is None:
            return self._events(data)
        if added:
            try:
                self._text(added)
            except Exception as exc:
                raise _Refused(exc) from exc
        return False

    def _chunk_text(self, decoded: str) -> str | None:
        """`ChunkReader.content` of the chunk on the data line `decoded`; None for a chunk the general path
        reads. Raises StopIteration or ValueError where the JSON scanner stops."""
        envelope = self.envelope
        if envelope and decoded.startswith(envelope):
            choices, end = _scan(decoded, len(envelope))
            if end == len(decoded) - 3 and decoded[end] == "}":
                return self._choices_content(choices)
            if decoded[end] == "," and _plain_members("{" + decoded[end + 1 :]):
                return self._choices_content(choices)
            return None
        chunk, end = _scan(decoded, 6)
        if end != len(decoded) - 2 or chunk.get("error"):
            return None
        if self._learning:
            self._learning -= 1
            self.envelope = _envelope(decoded)
        return self._content(chunk)

    def _events(self, data: bytes) -> bool:
        """The general path: every event the piece completes, each parsed and read on its own."""
        text, updates = self._text, self._updates
        for event in self._decoder.feed(data):
            added, done = _event_updates(event, self._reader, self._request)
            try:
                if isinstance(added, str):
                    if added:
                        text(added)
                elif added:
                    updates(added)
            except Exception as exc:
                raise _Refused(exc) from exc
            if done:
                return True
        return False


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


def _proxied(base_url: str) -> bool:
    """Whether the environment routes `base_url` through a proxy (``HTTPS_PROXY``, ``NO_PROXY``, ...)."""
    url = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.netloc)


def _http_client(settings: Settings, base_url: str, timeout: openai.Timeout) -> httpx2.AsyncClient:
    """The worker's own transport (`worker.transport`), which hands each stream's bytes to its reader as
    they arrive; openai's aiohttp transport when the operator asks for it, or when a proxy is configured,
    which the worker's transport does not speak."""
    if settings.upstream_transport == "openai" or _proxied(base_url):
        return openai.DefaultAioHttpClient(timeout=timeout)
    return httpx2.AsyncClient(transport=StreamingTransport(), timeout=timeout, follow_redirects=True)


class Upstream:
    """One shared ``AsyncOpenAI`` client (and its connection pool) per worker process."""

    def __init__(self, settings: Settings, http_client: httpx2.AsyncClient | None = None) -> None:
        """`http_client`: another httpx2 client for openai to use (by default the worker's transport's)."""
        timeout = openai.Timeout(
            settings.upstream_read_timeout_seconds, connect=settings.upstream_connect_timeout_seconds
        )
        base_url = settings.openai_base_url or "https://api.openai.com/v1"
        self.client = openai.AsyncOpenAI(
            http_client=http_client or _http_client(settings, base_url, timeout),
            base_url=base_url,
            # Local OpenAI-compatible servers often need no key, but the client insists on one.
            api_key=settings.openai_api_key.reveal() if settings.openai_api_key else "unset",
            max_retries=0,
            timeout=timeout,
        )

    async def close(self) -> None:
        await self.client.close()

    async def stream(self, request: dict[str, Any], take: Taker) -> None:
        """Stream one completion, handing its updates to `take` as they arrive, in order; returns when the
        upstream is done. What `take` raises ends the stream and comes out as it is. Leaving early (an
        exception, a cancellation) closes the HTTP request, which is how a provider learns to stop
        generating (and billing)."""
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
        feed = _reading(take, response.request)
        try:
            await _read_body(response, feed)
        except _Refused as refused:
            raise refused.error from None
        except httpx2.TimeoutException as exc:
            raise translate_error(openai.APITimeoutError(request=response.request)) from exc
        except (httpx2.RequestError, ssl.SSLError) as exc:
            raise translate_error(openai.APIConnectionError(request=response.request)) from exc
        except Exception as exc:
            raise translate_error(exc) from exc
        finally:
            await stream.close()


async def _read_body(response: httpx2.Response, feed: Callable[[bytes], bool]) -> None:
    """Hand the response's body to `feed` until it returns True or the body ends. From the worker's
    transport, in the connection's callback as bytes arrive (`Body.deliver`); from any other, by iterating
    its byte stream (decoded by httpx2 when the upstream compressed it)."""
    body = response.extensions.get(BODY)
    encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
    if isinstance(body, Body) and not encoded:
        await body.deliver(feed)
        return
    if encoded:
        raw: AsyncGenerator[bytes, None] = response.aiter_bytes()
    else:
        # The transport's byte stream itself (what openai's own drain reads): one generator layer fewer per
        # chunk than `response.aiter_raw()`, which only counts bytes on top.
        raw = cast(AsyncGenerator[bytes, None], response.stream.__aiter__())  # type: ignore[union-attr]
    try:
        async for data in raw:
            if feed(data):
                await _drain(raw)
                return
    finally:
        await raw.aclose()
