"""Durable Streams streams under ``/ds/``: create, append (and close), read, inspect, delete, fork.

Each handler parses the request, calls one store operation (a Lua script on the stream's slot, so every check
and its write are one atomic step), and maps the script's reply onto the protocol's answer. Reads go through
`api.http.ds.reading`, over the live engine.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from api.http.ds.protocol import (
    encode_offset,
    etag,
    json_messages,
    json_response,
    media_type,
    parse_expires_at,
    parse_offset,
    parse_ttl,
    response_cursor,
    same_config,
)
from api.http.ds.reading import Mode, Read, View, catch_up, long_poll, sse_body
from api.http.ds.wire import ALWAYS_HEADERS, Refusal, answer, parse_producer
from tokenfan.contract.errors import (
    Conflict,
    ContentTypeMismatch,
    InvalidOffset,
    InvalidProducer,
    InvalidRequest,
    ProducerSequenceGap,
    RateLimited,
    SequenceConflict,
    StaleProducerEpoch,
    StreamClosed,
    StreamExists,
    StreamGone,
    StreamNotFound,
    TooManyStreams,
)
from tokenfan.contract.keys import StreamKeys
from tokenfan.contract.offsets import StreamId
from tokenfan.runtime.auth import Principal
from tokenfan.store.streams import Copied, Producer

if TYPE_CHECKING:
    from api.http.app import Services

__all__ = [
    "append",
    "charge_append",
    "create",
    "delete",
    "head",
    "read",
    "read_parameters",
    "read_response",
    "view_of",
]

_OCTETS = "application/octet-stream"
_CONTENT_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+")
_FORK_OFFSET = re.compile(r"^[0-9]{1,20}_[0-9]{1,20}$")
_COUNT = re.compile(r"^(0|[1-9][0-9]{0,15})$")


def view_of(keys: StreamKeys, meta: dict[str, str]) -> View:
    ctn = meta.get("ctn", "")
    mode = Mode.JSON if ctn == "application/json" else Mode.TEXT if ctn.startswith("text/") else Mode.BYTES
    return View(keys.name, keys.path, mode, meta.get("ct", _OCTETS))


async def _meta(services: Services, keys: StreamKeys, *, touch: bool) -> dict[str, str]:
    meta = await services.store.stream_meta(keys, touch=touch)
    if meta is None:
        raise Refusal(StreamNotFound("no such stream"))
    if meta.get("deleted") == "1":
        raise Refusal(StreamGone("this stream was deleted; its forks still read it"))
    return meta


def _tail(meta: dict[str, str]) -> str:
    return encode_offset(StreamId.parse(meta.get("tail", "0-0")))


async def charge_append(services: Services, principal: Principal) -> None:
    """Take one append from the key's allowance (429 with Retry-After beyond it)."""
    wait = await services.store.rate_limit(f"ds:{principal.name}", services.settings.ds_appends_per_minute)
    if wait > 0:
        raise Refusal(RateLimited("too many appends for this API key; retry later", retry_after=wait))


# --- PUT


def _create_config(request: Request) -> dict[str, str]:
    """The configuration a PUT asks for, as the stream's metadata fields; 400 for malformed headers."""
    headers = request.headers
    ttl, expires_at = headers.get("stream-ttl"), headers.get("stream-expires-at")
    if ttl is not None and expires_at is not None:
        raise Refusal(InvalidRequest("give Stream-TTL or Stream-Expires-At, not both"))
    fork_of = headers.get("stream-forked-from", "").lstrip("/")
    content_type = headers.get("content-type", "")
    if not _CONTENT_TYPE.match(content_type.strip()):
        content_type = "" if fork_of else _OCTETS  # a fork without one inherits its source's
    fields = {
        "ct": content_type,
        "ctn": media_type(content_type),
        "ttl": str(parse_ttl(ttl)) if ttl is not None else "",
        "expires_at": expires_at or "",
        "expires_ms": str(parse_expires_at(expires_at)) if expires_at else "",
        "closed": "1" if headers.get("stream-closed", "").lower() == "true" else "",
        "fork_of": fork_of,
        "fork_offset": "",
        "fork_sub": "",
    }
    offset = headers.get("stream-fork-offset")
    if offset is not None:
        if not _FORK_OFFSET.fullmatch(offset):
            raise Refusal(InvalidRequest("Stream-Fork-Offset is an offset of the source stream"))
        fields["fork_offset"] = encode_offset(StreamId(*map(int, offset.split("_"))))
    sub = headers.get("stream-fork-sub-offset")
    if sub is not None:
        if not fork_of:
            raise Refusal(InvalidRequest("Stream-Fork-Sub-Offset needs Stream-Forked-From"))
        if not _COUNT.fullmatch(sub):
            raise Refusal(InvalidRequest("Stream-Fork-Sub-Offset is a whole number"))
        fields["fork_sub"] = "" if sub == "0" else sub
    return fields


def _existing(keys: StreamKeys, held: dict[str, str], wanted: dict[str, str]) -> Response:
    if held.get("deleted") == "1":
        raise Refusal(Conflict("a deleted stream's path stays taken while forks of it remain"))
    if not same_config(held, {**wanted, "ctn": wanted["ctn"] or _OCTETS}):
        raise Refusal(StreamExists("this stream exists with another configuration"))
    headers = {"Content-Type": held.get("ct", _OCTETS), "Stream-Next-Offset": _tail(held)}
    if held.get("closed") == "1":
        headers["Stream-Closed"] = "true"
    return answer(200, headers)


async def create(services: Services, principal: Principal, keys: StreamKeys, request: Request) -> Response:
    wanted = _create_config(request)
    body = await request.body()
    held = await services.store.stream_meta(keys, touch=False)
    if held is not None:
        return _existing(keys, held, wanted)
    limit = services.settings.ds_max_streams_per_key
    if limit and await services.store.owned_count(principal.name, limit=limit) >= limit:
        raise Refusal(TooManyStreams(f"an API key may hold {limit} streams; delete some first"))
    fields = {**wanted, "owner": principal.name}
    plan = await _fork_plan(services, fields) if wanted["fork_of"] else _Plan(StreamId.ZERO, [], [], None)
    try:
        own = plan.own + _initial(fields["ctn"], body)
        tail = await services.store.create_stream(
            keys, fields, last=plan.last, closed=fields["closed"] == "1", copied=plan.copied, own=own
        )
    except BaseException:
        await plan.release(services)
        raise
    if tail is None:  # another PUT made it first
        await plan.release(services)
        return _existing(keys, await _meta(services, keys, touch=False), wanted)
    await services.store.own(principal.name, keys.path, owned=True)
    headers = {
        "Location": str(request.url),
        "Content-Type": fields["ct"],
        "Stream-Next-Offset": encode_offset(tail),
    }
    if fields["closed"]:
        headers["Stream-Closed"] = "true"
    return answer(201, headers)


def _initial(ctn: str, body: bytes) -> list[bytes]:
    if ctn == "application/json":
        values = json_messages(body, allow_empty=True) if body else []
        return [",".join(values).encode()] if values else []
    return [body] if body else []


@dataclass
class _Plan:
    """What a fork starts with: the id before its own messages, its inherited messages, its sub-offset
    prefix, and the source it holds (released if the fork is not made after all)."""

    last: StreamId
    copied: list[Copied]
    own: list[bytes]
    source: StreamKeys | None

    async def release(self, services: Services) -> None:
        if self.source is not None:
            await services.store.delete_stream(self.source, "release")
            self.source = None


async def _fork_plan(services: Services, fields: dict[str, str]) -> _Plan:
    """Resolve a fork against its source (fills in `fields`), and hold the source while it is made."""
    source = StreamKeys(fields["fork_of"])
    meta = await services.store.stream_meta(source, touch=False)
    if meta is None:
        raise Refusal(StreamNotFound("the stream to fork does not exist"))
    at = _resolve_fork(fields, meta)
    code, _ = await services.store.delete_stream(source, "retain")
    if code != "kept":
        raise Refusal(StreamNotFound("the stream to fork does not exist"))
    plan = _Plan(at, [], [], source)
    try:
        plan.copied = await services.store.inherited(source, at)
        if fields["fork_sub"]:
            plan.own = [await _sub_prefix(services, source, at, int(fields["fork_sub"]), fields["ctn"])]
    except BaseException:
        await plan.release(services)
        raise
    return plan


def _resolve_fork(fields: dict[str, str], source: dict[str, str]) -> StreamId:
    """Check a fork against its source's metadata; fill in what it inherits; return its fork offset."""
    if source.get("deleted") == "1":
        raise Refusal(Conflict("the stream to fork was deleted"))
    if fields["ctn"] and fields["ctn"] != source.get("ctn"):
        raise Refusal(ContentTypeMismatch("a fork has its source's content type"))
    if not fields["ct"]:
        fields["ct"], fields["ctn"] = source.get("ct", _OCTETS), source.get("ctn", _OCTETS)
    tail = StreamId.parse(source.get("tail", "0-0"))
    at = StreamId(*map(int, fields["fork_offset"].split("_"))) if fields["fork_offset"] else tail
    if at > tail:
        raise Refusal(InvalidRequest("the fork offset is beyond the source stream's tail"))
    fields["fork_offset"] = encode_offset(at)
    if not fields["ttl"] and not fields["expires_at"]:  # a fork without expiry of its own takes its source's
        for name in ("ttl", "expires_at", "expires_ms"):
            fields[name] = source.get(name, "")
    return at


async def _sub_prefix(services: Services, source: StreamKeys, at: StreamId, count: int, ctn: str) -> bytes:
    """The first `count` values (JSON) or bytes of the source's message after `at`."""
    following = await services.store.read_after(source.name, at, 1, strict=False)
    if not following or not following[0].body:
        raise Refusal(InvalidRequest("the source has no message after the fork offset"))
    data = following[0].body
    if ctn == "application/json":
        values = json.loads(b"[" + data + b"]")
        if count > len(values):
            raise Refusal(InvalidRequest("the fork sub-offset is beyond the message"))
        return ",".join(
            json.dumps(value, ensure_ascii=False, separators=(",", ":")) for value in values[:count]
        ).encode()
    if count > len(data):
        raise Refusal(InvalidRequest("the fork sub-offset is beyond the message"))
    return data[:count]


# --- POST


async def append(services: Services, principal: Principal, keys: StreamKeys, request: Request) -> Response:
    producer = parse_producer(request)
    close = request.headers.get("stream-closed", "").lower() == "true"
    body = await request.body()
    if not body and not close:
        raise Refusal(InvalidRequest("an append needs a body"))
    content_type, data = request.headers.get("content-type"), b""
    if body:
        if not content_type:
            raise Refusal(InvalidRequest("an append needs a Content-Type"))
        data = body
        if media_type(content_type) == "application/json":
            data = ",".join(json_messages(body, allow_empty=False)).encode()
    await charge_append(services, principal)
    reply = await services.store.append_stream(
        keys,
        media_type=media_type(content_type) if body else "",
        data=data,
        close=close,
        stream_seq=request.headers.get("stream-seq"),
        producer=producer,
    )
    return _appended(reply, producer, close=close, with_data=bool(body))


def _appended(reply: list[str], producer: Producer | None, *, close: bool, with_data: bool) -> Response:
    code = reply[0]
    offset = encode_offset(StreamId.parse(reply[1])) if len(reply) > 1 else ""
    echo = {"Producer-Epoch": str(producer.epoch), "Producer-Seq": str(producer.seq)} if producer else {}
    closed = {"Stream-Closed": "true"} if close else {}
    if code == "ok":
        return answer(
            200 if producer and with_data else 204, {"Stream-Next-Offset": offset, **echo, **closed}
        )
    if code in ("dup", "dup_closed") and producer is not None:  # a retry of what is already in
        closed = {"Stream-Closed": "true"} if close or code == "dup_closed" else {}
        return answer(204, {"Stream-Next-Offset": offset, **echo, "Producer-Seq": reply[2], **closed})
    if code == "closed" and close and not with_data and producer is None:
        return answer(204, {"Stream-Next-Offset": offset, "Stream-Closed": "true"})  # closing is idempotent
    raise _append_refusal(reply, offset)


def _append_refusal(reply: list[str], offset: str) -> Refusal:
    code = reply[0]
    if code == "closed":
        return Refusal(
            StreamClosed("the stream is closed"), {"Stream-Closed": "true", "Stream-Next-Offset": offset}
        )
    if code == "stale":
        return Refusal(
            StaleProducerEpoch("a newer epoch of this producer fenced this one"), {"Producer-Epoch": reply[2]}
        )
    if code == "bad_epoch_seq":
        return Refusal(InvalidProducer("a new producer epoch starts at Producer-Seq 0"))
    if code == "gap":
        gap = {"Producer-Expected-Seq": reply[2], "Producer-Received-Seq": reply[3]}
        return Refusal(ProducerSequenceGap("a Producer-Seq was skipped"), gap)
    if code == "ct_mismatch":
        return Refusal(ContentTypeMismatch("the Content-Type is not the stream's"))
    if code == "seq_conflict":
        return Refusal(SequenceConflict("Stream-Seq must sort after the last one"))
    if code == "gone":
        return Refusal(StreamGone("this stream was deleted; its forks still read it"))
    return Refusal(StreamNotFound("no such stream"))


# --- GET, HEAD, DELETE


async def read(services: Services, principal: Principal, keys: StreamKeys, request: Request) -> Response:
    raw, live = read_parameters(request)
    position = parse_offset(raw)
    if position.epoch is not None:
        raise Refusal(InvalidOffset("not an offset of this stream"))
    meta = await _meta(services, keys, touch=True)
    tail = StreamId.parse(meta.get("tail", "0-0"))
    return await read_response(
        services,
        principal,
        view_of(keys, meta),
        request,
        after=tail if position.now else position.stream_id,
        epoch=None,
        live=live,
        now=position.now,
        closed=meta.get("closed") == "1",
    )


def read_parameters(request: Request) -> tuple[str | None, str | None]:
    """The ``offset`` (one at most, not empty) and ``live`` (long-poll, sse, or none) parameters."""
    offsets = request.query_params.getlist("offset")
    if len(offsets) > 1:
        raise Refusal(InvalidOffset("one offset at a time"))
    raw = offsets[0] if offsets else None
    if raw == "":
        raise Refusal(InvalidOffset("an empty offset"))
    live = request.query_params.get("live")
    if live not in (None, "long-poll", "sse"):
        raise Refusal(InvalidRequest("live is long-poll or sse"))
    if live and raw is None:
        raise Refusal(InvalidRequest("a live read needs an offset"))
    return raw, live


async def head(services: Services, keys: StreamKeys) -> Response:
    meta = await _meta(services, keys, touch=False)
    closed = meta.get("closed") == "1"
    headers = {
        "Content-Type": meta.get("ct", _OCTETS),
        "Stream-Next-Offset": _tail(meta),
        "Cache-Control": "no-store",  # the tail moves: never cache it
        "ETag": etag(keys.path, "-1", _tail(meta), closed=closed),
    }
    if closed:
        headers["Stream-Closed"] = "true"
    if meta.get("ttl"):
        headers["Stream-TTL"] = meta["ttl"]
    if meta.get("expires_at"):
        headers["Stream-Expires-At"] = meta["expires_at"]
    return answer(200, headers)


async def delete(services: Services, keys: StreamKeys) -> Response:
    meta = await services.store.stream_meta(keys, touch=False)
    code, fork_of = await services.store.delete_stream(keys, "delete")
    if code == "missing":
        raise Refusal(StreamNotFound("no such stream"))
    if code == "gone":
        raise Refusal(StreamGone("this stream was deleted already"))
    if meta is not None and meta.get("owner"):
        await services.store.own(meta["owner"], keys.path, owned=False)
    while fork_of:  # the last fork of a deleted source lets the source go, and so on up
        code, fork_of = await services.store.delete_stream(StreamKeys(fork_of), "release")
    return answer(204)


async def read_response(
    services: Services,
    principal: Principal,
    view: View,
    request: Request,
    *,
    after: StreamId,
    epoch: bytes | None,
    live: str | None,
    now: bool,
    closed: bool,
) -> Response:
    """Answer a read from `after` (the tail, for `now`) in the mode `live` asks for."""
    start = view.position(after, epoch)
    if now and live is None:
        headers = {
            "Content-Type": view.content_type,
            "Stream-Next-Offset": start,
            "Stream-Up-To-Date": "true",
        }
        headers["Cache-Control"] = "no-store"
        if closed:
            headers["Stream-Closed"] = "true"
        return answer(200, headers, b"[]" if view.mode is Mode.JSON else b"")
    if live == "sse":
        return _sse_response(services, principal, view, request, after, start)
    if live == "long-poll":
        found = await long_poll(services.bus, view, after, services.settings.ds_long_poll_seconds)
        cursor = request.query_params.get("cursor")
        if found is None or not found.entries:
            headers = {
                "Stream-Next-Offset": start,
                "Stream-Up-To-Date": "true",
                "Stream-Cursor": _cursor(cursor),
            }
            if found is not None and found.closed:
                headers["Stream-Closed"] = "true"
            return answer(204, headers)
        return _read_answer(view, found, request, position=start, cursor=cursor)
    found = await catch_up(services.bus, view, after)
    return _read_answer(view, found, request, position=start, public=services.settings.insecure_dev_mode)


def _sse_response(
    services: Services, principal: Principal, view: View, request: Request, after: StreamId, start: str
) -> Response:
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    headers.update(ALWAYS_HEADERS)
    if view.mode is Mode.BYTES:
        headers["Stream-SSE-Data-Encoding"] = "base64"
    body = sse_body(
        services.bus,
        view,
        after,
        start,
        cursor=request.query_params.get("cursor"),
        max_buffer_bytes=services.settings.relay_max_buffer_bytes,
        keepalive_seconds=services.settings.ds_long_poll_seconds,
        expires_at=principal.expires_at,
    )
    return StreamingResponse(body, headers=headers)  # no media_type: Starlette would add a charset


def _cursor(echoed: str | None) -> str:
    return response_cursor(echoed, int(time.time() * 1000))


def _read_answer(
    view: View,
    found: Read,
    request: Request,
    *,
    position: str,
    cursor: str | None = None,
    public: bool = False,
) -> Response:
    """200 with the messages found after `position` (or 304 when the client holds them already)."""
    datas = [view.data(entry) for entry in found.entries]
    end = view.offset(found.entries[-1]) if found.entries else position
    headers = {"Content-Type": view.content_type, "Stream-Next-Offset": end}
    if found.up_to_date:
        headers["Stream-Up-To-Date"] = "true"
        headers["Cache-Control"] = "no-cache"  # the tail moves: revalidate with the ETag
    else:  # a full chunk never changes: shared caches may collapse identical reads (protocol section 8)
        headers["Cache-Control"] = (
            f"{'public' if public else 'private'}, max-age=60, stale-while-revalidate=300"
        )
    if found.closed and found.up_to_date:
        headers["Stream-Closed"] = "true"
    if request.query_params.get("live") == "long-poll":
        headers["Stream-Cursor"] = _cursor(cursor)
    tag = etag(view.path, request.query_params.get("offset", "-1"), end, closed=found.closed)
    headers["ETag"] = tag
    if request.headers.get("if-none-match") == tag:
        return answer(304, {"ETag": tag})
    return answer(200, headers, json_response(datas) if view.mode is Mode.JSON else b"".join(datas))
