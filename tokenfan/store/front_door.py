"""What the OpenAI-compatible front door keeps in Redis beyond the generations themselves.

* **Response records.** A generation made through ``POST /v1/responses`` keeps the request members its
  Response object echoes (model, instructions, tools, sampling parameters…) under
  ``tf:{S}:gen:G:response``. The response id is the generation's own ULID (``resp_<ULID>`` for
  ``gen_<ULID>``), so no other index is needed: ``tf:generation:G`` already finds the session.
* **Where a generation's events begin.** Following one generation from its first event means reading
  after that event's predecessor, which the stream entry itself names (field ``p``): a strict read from
  there is refused (``OffsetGone``) if anything in between was trimmed, as for any resuming subscriber.

Every Redis failure leaves as `StorageUnavailable`.
"""

from __future__ import annotations

import json
from typing import Any

from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store import Store
from tokenfan.store.boundary import storage_call

__all__ = ["event_predecessor", "response_record", "save_response_record"]

#: Records outlive their generation by as much as the generation index does (`Store.accept`), so a
#: generation that still exists always has its record.
_EXTRA_TTL_SECONDS = 86_400


@storage_call
async def save_response_record(
    store: Store, session_id: str, generation_id: str, record: dict[str, Any]
) -> None:
    """Keep `record` (JSON-serializable) as the Responses request generation `generation_id` was made from."""
    await store.redis.set(
        SessionKeys(session_id).generation_response(generation_id),
        json.dumps(record, ensure_ascii=False, separators=(",", ":")),
        ex=store.session_ttl_seconds + _EXTRA_TTL_SECONDS,
    )


@storage_call
async def response_record(store: Store, session_id: str, generation_id: str) -> dict[str, Any] | None:
    """The record `save_response_record` kept, or None: the generation was not made as a response."""
    raw = await store.redis.get(SessionKeys(session_id).generation_response(generation_id))
    if raw is None:
        return None
    record: dict[str, Any] = json.loads(raw)
    return record


@storage_call
async def event_predecessor(store: Store, session_id: str, offset: Offset) -> StreamId | None:
    """The id of the entry before the event at `offset` (``0-0`` for the stream's first), or None when that
    event is no longer in the stream (trimmed, or the stream was recreated under another epoch)."""
    entries = await store.redis.xrange(
        SessionKeys(session_id).events, str(offset.stream_id), str(offset.stream_id)
    )
    if not entries:
        return None
    _, fields = entries[0]
    if fields.get(b"e", b"").decode() != offset.epoch:
        return None
    return StreamId.parse(fields.get(b"p", b"0-0"))
