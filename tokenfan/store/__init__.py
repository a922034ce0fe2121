"""The Redis side of the contract: every write and every consistent read of a session, as Lua scripts.

Why scripts: each step that must be atomic (append an event *and* record the text it adds *and* publish it
to the relays; finish a generation *and* hand the session to the next one) runs as one script on the one slot
that holds the session (`tokenfan.contract.keys`), so no crash between two commands can leave a half-written state.

Three invariants live here and nowhere else:

* **Exactly-once append.** Every event of a generation carries ``seq`` = previous + 1. The write script
  skips an event whose seq is already stored, so a write retried after an ambiguous failure (connection lost
  after the command was sent) can never show a subscriber the same event twice.
* **Fencing.** Writes carry the attempt number that `start` handed out; a write from an older attempt (a
  worker presumed dead that wakes up) is refused, so two attempts never interleave in one stream.
* **Gap detection for relays.** Each appended entry is published with its predecessor's id
  (``<epoch> <prev-id> <id> <body>``), so a relay that missed a pub/sub message notices and repairs from
  the stream instead of skipping.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from redis.asyncio import Redis

from tokenfan.contract.errors import OffsetGone, UnknownOffset
from tokenfan.contract.events import GenerationStatus, StreamEntry
from tokenfan.contract.ids import new_epoch
from tokenfan.contract.keys import (
    CANCEL_CHANNEL,
    GenerationField,
    SessionKeys,
    generation_index_key,
    rate_limit_key,
)
from tokenfan.contract.offsets import Offset, StreamId
from tokenfan.store.boundary import storage_call

__all__ = [
    "AcceptOutcome",
    "AcceptResult",
    "EventWrite",
    "Finish",
    "GenerationRecord",
    "SessionSnapshot",
    "StartOutcome",
    "StartResult",
    "Store",
    "WriteItem",
    "WriteOutcome",
    "WriteResult",
    "redis_client",
    "slot_of",
]

_COMMON_LUA = """
local function ensure_epoch(meta, candidate, now_ms)
  -- Returns the stream's epoch and its last entry id, creating the epoch on first use.
  local held = redis.call('HMGET', meta, 'epoch', 'last')
  if not held[1] then
    redis.call('HSET', meta, 'epoch', candidate, 'created_ms', now_ms, 'last', '0-0')
    return candidate, '0-0'
  end
  return held[1], held[2] or '0-0'
end
"""

# KEYS: meta, gen, queue, generations, events, idempotency (a per-session name even when unused)
# ARGV: now_ms, epoch candidate, ttl, generation id, request json, model, policy, max generations kept,
#       idempotency ttl (0 = no idempotency key), cancellation channel
# Returns {outcome, generation id, queue position (0 = not queued), epoch}.
_ACCEPT_LUA = (
    _COMMON_LUA
    + """
local meta, gen, queue, generations, events, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now_ms, candidate, ttl, gid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local request, model, policy, keep = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local idem_ttl = tonumber(ARGV[9])
local function position(id)
  local at = redis.call('LPOS', queue, id)
  if at then return tostring(at + 1) end
  return '0'
end
local existing = false
if idem_ttl > 0 then existing = redis.call('GET', idem) end
if not existing and redis.call('EXISTS', gen) == 1 then existing = gid end  -- this very call, retried
if existing then
  return {'duplicate', existing, position(existing), redis.call('HGET', meta, 'epoch') or ''}
end
local queued = redis.call('LLEN', queue)
if policy == 'reject' and queued > 0 then
  return {'conflict', redis.call('LINDEX', queue, 0), '0', ''}
end
local epoch = ensure_epoch(meta, candidate, now_ms)
redis.call('HSET', gen, 'status', 'queued', 'attempt', 0, 'seq', 0, 'request', request, 'model', model,
  'created_ms', now_ms)
local position = queued + 1
if policy == 'interrupt' and queued > 0 then
  -- The head (running, or about to run) is cancelled; this one runs right after it.
  local head = redis.call('LINDEX', queue, 0)
  local head_key = string.sub(meta, 1, #meta - 4) .. 'gen:' .. head
  if not redis.call('HGET', head_key, 'cancel_requested') then
    redis.call('HSET', head_key, 'cancel_requested', 'interrupted')
    redis.call('PUBLISH', ARGV[10], head .. ' interrupted')
  end
  redis.call('LINSERT', queue, 'AFTER', head, gid)
  position = 2
else
  redis.call('RPUSH', queue, gid)
end
redis.call('RPUSH', generations, gid)
redis.call('LTRIM', generations, -keep, -1)
if idem_ttl > 0 then redis.call('SET', idem, gid, 'EX', idem_ttl) end
for _, key in ipairs({meta, gen, queue, generations}) do redis.call('EXPIRE', key, ttl) end
if redis.call('EXISTS', events) == 1 then redis.call('EXPIRE', events, ttl) end
return {'accepted', gid, tostring(position), epoch}
"""
)

# KEYS: gen; ARGV: attempt, lease deadline ms (0 releases it). Returns the cancel request ('' for none).
_LEASE_LUA = """
local gen = KEYS[1]
if redis.call('HGET', gen, 'attempt') ~= ARGV[1] or redis.call('HGET', gen, 'status') ~= 'running' then
  return 'fenced'
end
redis.call('HSET', gen, 'lease_until_ms', ARGV[2])
return redis.call('HGET', gen, 'cancel_requested') or ''
"""

# GCRA rate limit. KEYS: the limiter; ARGV: now_ms, emission interval ms, burst (requests).
# Returns 0 when allowed, else the milliseconds to wait.
_RATE_LUA = """
local now, interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local allowed_at = tat + interval - burst * interval
if allowed_at > now then return allowed_at - now end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now) + 1000)
return 0
"""

# KEYS: gen; ARGV: reason, cancellation channel, generation id. Returns the status it found.
_CANCEL_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if (status == 'queued' or status == 'running') and not redis.call('HGET', KEYS[1], 'cancel_requested') then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. ARGV[1])
end
return status
"""

# KEYS: gen, queue; ARGV: now_ms, lease ms, max attempts, start token (unique per job run: makes a retry
# of this very call return the same attempt instead of taking another one), generation id
_START_LUA = """
local gen, queue = KEYS[1], KEYS[2]
local now_ms, lease_ms, max_attempts, token = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local status = redis.call('HGET', gen, 'status')
if not status then return {'missing', '0', '0', '', ''} end
if status ~= 'queued' and status ~= 'running' then return {'terminal', '0', '0', '', ''} end
if status == 'queued' and redis.call('LINDEX', queue, 0) ~= ARGV[5] then
  return {'waiting', '0', '0', '', ''}  -- its turn has not come: the generation ahead enqueues it when done
end
local attempt = tonumber(redis.call('HGET', gen, 'attempt') or '0')
local seq = redis.call('HGET', gen, 'seq') or '0'
local request = redis.call('HGET', gen, 'request') or ''
local cancel = redis.call('HGET', gen, 'cancel_requested') or ''
if status == 'running' and redis.call('HGET', gen, 'start_token') == token then
  local outcome = 'started'
  if attempt > max_attempts then outcome = 'exhausted' elseif attempt > 1 then outcome = 'restarted' end
  return {outcome, tostring(attempt), seq, request, cancel}
end
local lease = tonumber(redis.call('HGET', gen, 'lease_until_ms') or '0')
if status == 'running' and lease > now_ms then
  return {'busy', tostring(lease - now_ms), '0', '', ''}
end
attempt = redis.call('HINCRBY', gen, 'attempt', 1)
redis.call('HSET', gen, 'status', 'running', 'lease_until_ms', now_ms + lease_ms, 'start_token', token)
if status == 'queued' then redis.call('HSET', gen, 'started_ms', now_ms) end
local outcome = 'started'
if attempt > max_attempts then outcome = 'exhausted' elseif attempt > 1 then outcome = 'restarted' end
return {outcome, tostring(attempt), seq, request, cancel}
"""

# Per item, KEYS: events, meta, gen, text, queue, generations, reasoning.
# ARGV: now_ms, maxlen, ttl, epoch candidate, item count, then per item:
#   mode ('A' append | 'F' finish), attempt, channel, generation id, event count, tool calls json ('' = none),
#   event count x (seq, body, text piece, reasoning piece),
#   and for 'F': status, finish_reason, usage json, error json
_WRITE_LUA = (
    _COMMON_LUA
    + """
local now_ms, maxlen, ttl, candidate = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local items = tonumber(ARGV[5])
local a = 6
local results = {}
for i = 1, items do
  local k = (i - 1) * 7
  local events, meta, gen, text, queue, generations, reasoning =
    KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6], KEYS[k + 7]
  local mode, attempt, channel, gid = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local count, tool_calls = tonumber(ARGV[a + 4]), ARGV[a + 5]
  local first_event = a + 6
  a = first_event + count * 4
  local fin = a
  if mode == 'F' then a = a + 4 end
  -- One read and one write of each hash per item, whatever the number of events: at one token per event
  -- (a slow model, a short flush window) the bookkeeping would otherwise outnumber the appends.
  local state = redis.call('HMGET', gen, 'status', 'attempt', 'seq', 'cancel_requested')
  local status, current = state[1], state[2]
  local last_seq = tonumber(state[3] or '0')
  local final_seq = count > 0 and tonumber(ARGV[first_event + (count - 1) * 4]) or last_seq
  local writable = current == attempt and (status == 'running' or (mode == 'F' and status == 'queued'))
  local cancel = state[4] or ''
  if not writable then
    local code = 'fenced'
    if mode == 'F' and current == attempt and status and last_seq >= final_seq
       and status ~= 'running' and status ~= 'queued' then
      code = 'ok'  -- a finish retried after an ambiguous failure: it already happened
    end
    local head = redis.call('LINDEX', queue, 0) or ''
    results[i] = {code, '', '', tostring(last_seq), cancel, head, status or ''}
  else
    local epoch, prev = ensure_epoch(meta, candidate, now_ms)
    local start = prev
    local texts, reasonings = {}, {}
    local fields = {}
    local code = 'ok'
    for j = 0, count - 1 do
      local at = first_event + j * 4
      local seq = tonumber(ARGV[at])
      if seq == last_seq + 1 then
        local body = ARGV[at + 1]
        local id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'e', epoch, 'p', prev, 'd', body)
        redis.call('PUBLISH', channel, epoch .. ' ' .. prev .. ' ' .. id .. ' ' .. body)
        if ARGV[at + 2] ~= '' then texts[#texts + 1] = ARGV[at + 2] end
        if ARGV[at + 3] ~= '' then reasonings[#reasonings + 1] = ARGV[at + 3] end
        if last_seq == 0 then fields[#fields + 1] = 'first_offset'; fields[#fields + 1] = epoch .. ':' .. id end
        prev = id
        last_seq = seq
      elseif seq > last_seq + 1 then
        code = 'gap'
        break
      end
    end
    if #texts > 0 then redis.call('APPEND', text, table.concat(texts)) end
    if #reasonings > 0 then redis.call('APPEND', reasoning, table.concat(reasonings)) end
    if prev ~= start then redis.call('HSET', meta, 'last', prev) end
    fields[#fields + 1] = 'seq'
    fields[#fields + 1] = last_seq
    if tool_calls ~= '' and code == 'ok' then
      fields[#fields + 1] = 'tool_calls'
      fields[#fields + 1] = tool_calls
    end
    if prev ~= '0-0' then
      fields[#fields + 1] = 'last_offset'
      fields[#fields + 1] = epoch .. ':' .. prev
    end
    local head = ''
    local finishing = mode == 'F' and code == 'ok'
    if finishing then
      for _, value in ipairs({'status', ARGV[fin], 'finish_reason', ARGV[fin + 1], 'finished_ms', now_ms}) do
        fields[#fields + 1] = value
      end
      if ARGV[fin + 2] ~= '' then fields[#fields + 1] = 'usage'; fields[#fields + 1] = ARGV[fin + 2] end
      if ARGV[fin + 3] ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[fin + 3] end
    end
    redis.call('HSET', gen, unpack(fields))
    if finishing then
      redis.call('HDEL', gen, 'lease_until_ms')
      redis.call('LREM', queue, 1, gid)
      head = redis.call('LINDEX', queue, 0) or ''
      for _, key in ipairs({events, meta, gen, text, queue, generations, reasoning}) do
        redis.call('EXPIRE', key, ttl)
      end
      status = ARGV[fin]
    end
    results[i] = {code, epoch, prev, tostring(last_seq), cancel, head, status}
  end
end
return results
"""
)

# KEYS: meta, events; ARGV: stream id the client holds ('' for none)
# Returns {epoch, first id, predecessor of the first, last id, held id present (0/1)}.
_POSITION_LUA = """
local meta, events, held = KEYS[1], KEYS[2], ARGV[1]
local epoch = redis.call('HGET', meta, 'epoch') or ''
local first = redis.call('XRANGE', events, '-', '+', 'COUNT', 1)[1]
if not first then return {epoch, '0-0', '0-0', '0-0', 0} end
local first_prev = '0-0'
for i = 1, #first[2], 2 do
  if first[2][i] == 'p' then first_prev = first[2][i + 1] end
end
local last = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)[1][1]
local present = 0
if held ~= '' and #redis.call('XRANGE', events, held, held) > 0 then present = 1 end
return {epoch, first[1], first_prev, last, present}
"""

# KEYS: events; ARGV: exclusive start id, count, strict (1: the page must follow the start id).
# Each entry names its predecessor ('p'): the page follows on iff its first entry's predecessor is the start.
# Returns {'ok', entries} or {'gone'} when entries after the start id were trimmed.
_READ_LUA = """
local page = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
if ARGV[3] == '1' and #page > 0 then
  local fields = page[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and fields[i + 1] ~= ARGV[1] then return {'gone'} end
  end
end
return {'ok', page}
"""

# KEYS: meta, generations. ARGV: since (a stream id; '' for every retained generation).
# Returns {epoch, last id, then per generation: id, hash, text, reasoning}, oldest first: the whole session, or
# only the generations with an event after `since` (generations run one after another, so walking back
# from the newest stops at the first finished one that ended at or before `since`).
_SNAPSHOT_LUA = """
local meta, generations, since = KEYS[1], KEYS[2], ARGV[1]
local function after(offset, bound)
  local ms, seq = string.match(offset, ':(%d+)-(%d+)$')
  local bms, bseq = string.match(bound, '^(%d+)-(%d+)$')
  ms, seq, bms, bseq = tonumber(ms), tonumber(seq), tonumber(bms), tonumber(bseq)
  return ms > bms or (ms == bms and seq > bseq)
end
local out = {redis.call('HGET', meta, 'epoch') or '', redis.call('HGET', meta, 'last') or '0-0'}
local ids = redis.call('LRANGE', generations, 0, -1)
local prefix = string.sub(meta, 1, #meta - 4)
local picked = {}
for i = #ids, 1, -1 do
  local gen = prefix .. 'gen:' .. ids[i]
  local fields = redis.call('HGETALL', gen)
  if #fields > 0 then
    local last_offset = redis.call('HGET', gen, 'last_offset')
    if since ~= '' and last_offset and not after(last_offset, since) then
      local status = redis.call('HGET', gen, 'status')
      if status ~= 'queued' and status ~= 'running' then break end
    elseif since == '' or last_offset then
      local text = redis.call('GET', gen .. ':text') or ''
      table.insert(picked, 1, {ids[i], fields, text, redis.call('GET', gen .. ':reasoning') or ''})
    end
  end
end
for _, item in ipairs(picked) do
  for j = 1, 4 do table.insert(out, item[j]) end
end
return out
"""


class AcceptOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # an Idempotency-Key seen before: the earlier generation is returned
    CONFLICT = "conflict"  # policy=reject and the session is busy


@dataclass(frozen=True, slots=True)
class AcceptResult:
    outcome: AcceptOutcome
    generation_id: str  # the new one, the earlier duplicate, or the one the session is busy with
    queue_position: (
        int  # 1 = at the head: the caller enqueues its job (again, for a duplicate); 0 = not queued
    )
    epoch: str


class StartOutcome(StrEnum):
    STARTED = "started"
    RESTARTED = "restarted"  # an earlier attempt's lease expired: its worker is presumed dead
    EXHAUSTED = "exhausted"  # too many attempts: the caller must fail the generation
    BUSY = "busy"  # another worker holds a live lease
    TERMINAL = "terminal"  # already finished (cancelled while queued, or a duplicate job)
    MISSING = "missing"  # expired, never existed, or not accepted yet (its job may be enqueued first)
    WAITING = "waiting"  # queued behind another generation of its session: not its turn yet


@dataclass(frozen=True, slots=True)
class StartResult:
    outcome: StartOutcome
    attempt: int
    last_seq: int
    request: dict[str, Any] | None
    busy_for_ms: int = 0
    cancel_requested: str = ""  # cancellation was asked for before this attempt started


@dataclass(frozen=True, slots=True)
class EventWrite:
    seq: int
    body: str  # the encoded event body (`tokenfan.contract.events.encode_body`)
    text: str = ""  # what this event adds to the generation's text
    reasoning: str = ""  # what it adds to the generation's reasoning


@dataclass(frozen=True, slots=True)
class Finish:
    status: GenerationStatus
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass(slots=True)
class WriteItem:
    session_id: str
    generation_id: str
    attempt: int
    events: list[EventWrite] = field(default_factory=list)
    finish: Finish | None = None
    tool_calls: str = ""  # JSON of the generation's tool calls so far, when they changed ('' = unchanged)


class WriteOutcome(StrEnum):
    OK = "ok"
    FENCED = "fenced"  # not this attempt's to write any more (restarted elsewhere, or finished)
    GAP = "gap"  # a seq was skipped: a bug in the caller, never retried


@dataclass(frozen=True, slots=True)
class WriteResult:
    outcome: WriteOutcome
    last_seq: int
    last_offset: Offset | None
    cancel_requested: str  # '' or why cancellation was asked for
    next_generation_id: str | None  # after a finish: the session's next generation, to enqueue
    status: str


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    """The non-incremental view of one generation: everything known about it right now."""

    generation_id: str
    session_id: str
    status: GenerationStatus
    text: str
    reasoning: str
    tool_calls: list[dict[str, Any]]
    attempt: int
    seq: int
    model: str | None
    finish_reason: str | None
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    created_ms: int | None
    started_ms: int | None
    finished_ms: int | None
    first_offset: str | None
    last_offset: str | None
    cancel_requested: str | None

    @classmethod
    def from_fields(
        cls, session_id: str, generation_id: str, raw: dict[bytes, bytes], text: bytes, reasoning: bytes = b""
    ) -> GenerationRecord:
        fields = {k.decode(): v.decode() for k, v in raw.items()}

        def optional_int(name: str) -> int | None:
            value = fields.get(name)
            return int(value) if value else None

        def optional_json(name: str) -> dict[str, Any] | None:
            value = fields.get(name)
            return json.loads(value) if value else None

        return cls(
            generation_id=generation_id,
            session_id=session_id,
            status=GenerationStatus(fields[GenerationField.STATUS]),
            text=text.decode(),
            reasoning=reasoning.decode(),
            tool_calls=json.loads(fields[GenerationField.TOOL_CALLS])
            if GenerationField.TOOL_CALLS in fields
            else [],
            attempt=int(fields.get(GenerationField.ATTEMPT, "0")),
            seq=int(fields.get(GenerationField.SEQ, "0")),
            model=fields.get(GenerationField.MODEL),
            finish_reason=fields.get(GenerationField.FINISH_REASON) or None,
            usage=optional_json(GenerationField.USAGE),
            error=optional_json(GenerationField.ERROR),
            created_ms=optional_int(GenerationField.CREATED_MS),
            started_ms=optional_int(GenerationField.STARTED_MS),
            finished_ms=optional_int(GenerationField.FINISHED_MS),
            first_offset=fields.get(GenerationField.FIRST_OFFSET),
            last_offset=fields.get(GenerationField.LAST_OFFSET),
            cancel_requested=fields.get(GenerationField.CANCEL_REQUESTED) or None,
        )

    def as_json(self) -> dict[str, Any]:
        """The documented JSON view (``GET /v1/generations/{id}``, and inside ``snapshot`` frames)."""
        return {
            "generation_id": self.generation_id,
            "session_id": self.session_id,
            "status": self.status.value,
            "text": self.text,
            "reasoning": self.reasoning,
            "tool_calls": self.tool_calls,
            "model": self.model,
            "attempt": self.attempt,
            "seq": self.seq,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "error": self.error,
            "created_at_ms": self.created_ms,
            "started_at_ms": self.started_ms,
            "finished_at_ms": self.finished_ms,
            "first_offset": self.first_offset,
            "last_offset": self.last_offset,
        }


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """A session's retained generations, consistent with `offset`: resume after it to continue live."""

    session_id: str
    offset: Offset | None
    generations: list[GenerationRecord]


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot_of(session_id: str) -> int:
    """The Redis Cluster slot holding every key of `session_id` (its hash tag)."""
    return _crc16(session_id.encode()) % 16384


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    """Typed access to the scripts above. One per process; safe to share between tasks."""

    def __init__(
        self,
        redis: Redis,
        *,
        session_ttl_seconds: int,
        stream_max_length: int,
        cluster: bool = False,
        lease_ms: int = 30_000,
        max_attempts: int = 3,
        generations_kept: int = 1_000,
    ) -> None:
        self.redis = redis
        self.cluster = cluster
        self.session_ttl_seconds = session_ttl_seconds
        self.stream_max_length = stream_max_length
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.generations_kept = generations_kept
        self._accept = redis.register_script(_ACCEPT_LUA)
        self._start = redis.register_script(_START_LUA)
        self._lease = redis.register_script(_LEASE_LUA)
        self._cancel = redis.register_script(_CANCEL_LUA)
        self._rate = redis.register_script(_RATE_LUA)
        self._write = redis.register_script(_WRITE_LUA)
        self._position = redis.register_script(_POSITION_LUA)
        self._snapshot = redis.register_script(_SNAPSHOT_LUA)
        self._read = redis.register_script(_READ_LUA)

    @storage_call
    async def ping(self) -> None:
        """Raises `StorageUnavailable` unless Redis answers."""
        await self.redis.ping()

    # --- API side

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
        """Record a new generation at the back of its session's queue (or refuse it, per `policy`)."""
        keys = SessionKeys(session_id)
        # The index lets GET /v1/generations/{id} find the session; it outlives the session's own keys.
        await self.redis.set(
            generation_index_key(generation_id), session_id, ex=self.session_ttl_seconds + 86_400, nx=True
        )
        reply = await self._accept(
            keys=[
                keys.meta,
                keys.generation(generation_id),
                keys.queue,
                keys.generations,
                keys.events,
                keys.idempotency(idempotency_key or ""),
            ],
            args=[
                _now_ms(),
                new_epoch(),
                self.session_ttl_seconds,
                generation_id,
                json.dumps(request, ensure_ascii=False, separators=(",", ":")),
                model,
                policy,
                self.generations_kept,
                idempotency_ttl_seconds if idempotency_key else 0,
                CANCEL_CHANNEL,
            ],
        )
        outcome, value, position, epoch = (part.decode() for part in reply)
        return AcceptResult(AcceptOutcome(outcome), value, int(position), epoch)

    @storage_call
    async def session_of(self, generation_id: str) -> str | None:
        value = await self.redis.get(generation_index_key(generation_id))
        return value.decode() if value is not None else None

    @storage_call
    async def is_queued(self, session_id: str, generation_id: str) -> bool:
        """Whether the generation is accepted and has not started (nor ended) yet."""
        pending = self.redis.hget(SessionKeys(session_id).generation(generation_id), "status")
        status = await cast(Awaitable[bytes | None], pending)
        return status == GenerationStatus.QUEUED.value.encode()

    @storage_call
    async def generation(self, generation_id: str) -> GenerationRecord | None:
        session_id = await self.session_of(generation_id)
        if session_id is None:
            return None
        keys = SessionKeys(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.generation(generation_id))
            pipe.get(keys.generation_text(generation_id))
            pipe.get(keys.generation_reasoning(generation_id))
            raw, text, reasoning = await pipe.execute()
        if not raw:
            return None
        return GenerationRecord.from_fields(session_id, generation_id, raw, text or b"", reasoning or b"")

    @storage_call
    async def snapshot(self, session_id: str, since: StreamId | None = None) -> SessionSnapshot | None:
        """The session's retained generations (or those with events after `since`), consistent with the
        returned offset: the state is exactly the state after the event at that offset."""
        keys = SessionKeys(session_id)
        reply = await self._snapshot(keys=[keys.meta, keys.generations], args=[str(since) if since else ""])
        epoch, last = reply[0].decode(), reply[1].decode()
        if not epoch:
            return None
        records = [
            GenerationRecord.from_fields(
                session_id, reply[i].decode(), _pairs(reply[i + 1]), reply[i + 2], reply[i + 3]
            )
            for i in range(2, len(reply), 4)
        ]
        offset = Offset(epoch, StreamId.parse(last)) if last != "0-0" else None
        return SessionSnapshot(session_id, offset, records)

    @storage_call
    async def rate_limit(self, name: str, per_minute: int) -> float:
        """Take one request of `name`'s allowance (bursts of a tenth of a minute's worth pass); returns 0
        when allowed, else the seconds to wait. Shared by every process using this Redis."""
        if per_minute <= 0:
            return 0.0
        interval = 60_000 / per_minute
        burst = max(1, per_minute // 10)
        wait = await self._rate(keys=[rate_limit_key(name)], args=[_now_ms(), interval, burst])
        return float(wait) / 1000

    @storage_call
    async def request_cancel(
        self, session_id: str, generation_id: str, reason: str
    ) -> GenerationStatus | None:
        """Flag a queued or running generation for cancellation and tell every worker; returns the status
        it had (None when it does not exist). The worker running it ends it with ``generation.cancelled``."""
        status = await self._cancel(
            keys=[SessionKeys(session_id).generation(generation_id)],
            args=[reason, CANCEL_CHANNEL, generation_id],
        )
        return None if status == b"missing" else GenerationStatus(status.decode())

    @storage_call
    async def claim_watching(self, session_ids: Sequence[str], owner: str, ttl_ms: int) -> None:
        """This process has subscribers of these sessions, for the next `ttl_ms` (renew before it ends)."""
        now = _now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                key = SessionKeys(session_id).watchers
                pipe.zadd(key, {owner: now + ttl_ms})
                pipe.zremrangebyscore(key, 0, now)
                pipe.pexpire(key, ttl_ms * 2)
            await pipe.execute()

    @storage_call
    async def release_watching(self, session_id: str, owner: str) -> None:
        await self.redis.zrem(SessionKeys(session_id).watchers, owner)

    @storage_call
    async def watched(self, session_ids: Sequence[str]) -> list[bool]:
        """Whether any process currently claims subscribers of each session."""
        now = _now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.zcount(SessionKeys(session_id).watchers, f"({now}", "+inf")
            counts = await pipe.execute()
        return [bool(count) for count in counts]

    # --- worker side

    @storage_call
    async def start(self, session_id: str, generation_id: str) -> StartResult:
        """Take a generation for a new attempt; see `StartOutcome` for what the caller does next."""
        keys = SessionKeys(session_id)
        outcome, attempt, seq, request, cancel = await self._start(
            keys=[keys.generation(generation_id), keys.queue],
            args=[_now_ms(), self.lease_ms, self.max_attempts, new_epoch() + new_epoch(), generation_id],
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

        Returns, per entry, ``''``, the cancellation reason when one was requested, or ``'fenced'`` when
        the attempt lost the generation. One round trip for all of them.
        """
        if not running:
            return []
        until = _now_ms() + self.lease_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id, generation_id, attempt in running:
                keys = [SessionKeys(session_id).generation(generation_id)]
                await self._lease(keys=keys, args=[attempt, until], client=pipe)
            replies = await pipe.execute()
        return [reply.decode() for reply in replies]

    @storage_call
    async def release_lease(self, session_id: str, generation_id: str, attempt: int) -> None:
        """Give a running generation back (shutdown): the next worker restarts it without waiting."""
        await self._lease(keys=[SessionKeys(session_id).generation(generation_id)], args=[attempt, 0])

    @storage_call
    async def write(self, items: Sequence[WriteItem]) -> list[WriteResult]:
        """Append (and finish) for many generations: one script call per cluster slot, pipelined.

        Safe to retry as a whole after any failure: already-stored events are skipped by seq.
        """
        if not items:
            return []
        now, epoch = _now_ms(), new_epoch()
        if not self.cluster:
            # One Redis: one script call carries every generation, whatever its slot.
            keys, args = self._write_arguments(items, now, epoch)
            return [_write_result(row) for row in await self._write(keys=keys, args=args)]
        by_slot: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_slot[slot_of(item.session_id)].append(index)
        groups = list(by_slot.values())
        results: list[WriteResult | None] = [None] * len(items)
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in groups:
                keys, args = self._write_arguments([items[i] for i in group], now, epoch)
                await self._write(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        for group, reply in zip(groups, replies, strict=True):
            for index, row in zip(group, reply, strict=True):
                results[index] = _write_result(row)
        return [result for result in results if result is not None]

    def _write_arguments(
        self, items: Sequence[WriteItem], now: int, epoch: str
    ) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [now, self.stream_max_length, self.session_ttl_seconds, epoch, len(items)]
        for item in items:
            names = SessionKeys(item.session_id)
            gen = item.generation_id
            keys += [
                names.events,
                names.meta,
                names.generation(gen),
                names.generation_text(gen),
                names.queue,
                names.generations,
                names.generation_reasoning(gen),
            ]
            args += [
                "F" if item.finish else "A",
                item.attempt,
                names.live,
                gen,
                len(item.events),
                item.tool_calls,
            ]
            for event in item.events:
                args += [event.seq, event.body, event.text, event.reasoning]
            if item.finish is not None:
                finish = item.finish
                args += [
                    finish.status.value,
                    finish.finish_reason or "",
                    json.dumps(finish.usage) if finish.usage is not None else "",
                    json.dumps(finish.error) if finish.error is not None else "",
                ]
        return keys, args

    # --- relay side

    @storage_call
    async def check_resume(self, session_id: str, offset: Offset | None) -> StreamId:
        """Validate where a subscriber wants to resume; return the stream id to read after.

        Raises `OffsetGone` when the offset's epoch is not the stream's (deleted and recreated, or expired)
        or when entries after it were trimmed, and `UnknownOffset` when it names no entry this stream had.
        """
        if offset is None:
            return StreamId.ZERO
        keys = SessionKeys(session_id)
        reply = await self._position(keys=[keys.meta, keys.events], args=[str(offset.stream_id)])
        epoch, first_previous = reply[0].decode(), reply[2].decode()
        if epoch != offset.epoch:
            raise OffsetGone("this offset belongs to an earlier incarnation of the session's stream; rebuild")
        held, before_oldest = offset.stream_id, StreamId.parse(first_previous)
        if reply[4] or held == before_oldest != StreamId.ZERO:
            return held  # it is retained, or it was trimmed but everything after it is still here
        if held < before_oldest:
            raise OffsetGone("events after this offset are no longer retained; rebuild from a snapshot")
        # Beyond the newest entry, or between two entries: this stream never had such an event.
        raise UnknownOffset("no event of this session has this offset")

    @storage_call
    async def tail(self, session_id: str) -> tuple[bytes | None, StreamId]:
        """The session's epoch (None before its first generation) and newest entry id."""
        pending = self.redis.hmget(SessionKeys(session_id).meta, ["epoch", "last"])
        epoch, last = await cast(Awaitable[list[bytes | None]], pending)
        return epoch, StreamId.parse(last) if last else StreamId.ZERO

    @storage_call
    async def read_after(
        self, session_id: str, after: StreamId, count: int, *, strict: bool = True
    ) -> list[StreamEntry]:
        """Up to `count` entries with ids strictly greater than `after`, oldest first.

        With `strict` (always, except when reading a session's retained history from its very start),
        raises `OffsetGone` when entries after `after` were trimmed: the page would not follow on.
        """
        reply = await self._read(
            keys=[SessionKeys(session_id).events],
            args=[str(after), count, 1 if strict and after != StreamId.ZERO else 0],
        )
        if reply[0] == b"gone":
            raise OffsetGone("events after this position are no longer retained; rebuild from a snapshot")
        return [_entry(entry_id, _pairs(fields)) for entry_id, fields in reply[1]]


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEntry:
    return StreamEntry(StreamId.parse(entry_id), fields[b"e"], fields[b"d"])


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _write_result(row: list[Any]) -> WriteResult:
    code, epoch, last, last_seq, cancel, head, status = (
        part.decode() if isinstance(part, bytes) else str(part) for part in row
    )
    offset = Offset(epoch, StreamId.parse(last)) if epoch and last != "0-0" else None
    return WriteResult(WriteOutcome(code), int(last_seq), offset, cancel, head or None, status)


def redis_client(url: str) -> Redis:
    """A client that reconnects and retries commands after a dropped connection.

    Retrying is safe for every script here: each is idempotent (accept by generation id, start by token,
    write by seq, lease by attempt).
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    tls = {"ssl_check_hostname": True} if url.startswith("rediss://") else {}  # the URL's own choice wins
    return Redis.from_url(  # type: ignore[no-any-return]
        url,
        **tls,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_keepalive=True,
        health_check_interval=15,
    )
