-- Append events (and finish) for many generations in one call: one item per generation.
-- Prepended at load time: common.lua, then the layout's offsets (write_layout.py generates them, from the
-- same NamedTuples whose instances the caller puts in KEYS and ARGV):
-- KEYS: per item, ItemKeys: events, meta, gen, text, queue, generations, reasoning, live (the channel)
-- ARGV: WriteCall: now_ms, maxlen, ttl, epoch candidate, item count; then per item:
--       ItemHead: mode ('A' append | 'F' finish), attempt, generation id, event count, tool calls json
--       ('' = unchanged); event count x EventWrite: seq, body, text piece, reasoning piece, restarts
--       ('1': the event restarts the generation: what the dead attempt produced is cleared first);
--       and for 'F' a FinishArgs: status, finish_reason, usage json, error json
-- Reply: per item {code, epoch, newest entry id, last seq, cancel reason, next head, status}; code is 'ok',
--   'fenced' (not this attempt's to write: restarted elsewhere, or ended), or 'gap' (a seq was skipped).
--   The reply of a generation written and still running with no cancellation asked for (code 'ok', no
--   cancel reason, no next head, status 'running'; nearly all of them) is one string instead:
--   '<epoch> <newest entry id> <last seq>', cheaper to send and to read back, at every flush.
-- Each appended entry is published (SPUBLISH: a shard channel, in the session's slot) on the session's
-- channel as '<epoch> <previous id> <id> <body>'.
local now_ms, maxlen = ARGV[1 + CALL_NOW_MS], ARGV[1 + CALL_MAXLEN]
local ttl, candidate = tonumber(ARGV[1 + CALL_TTL]), ARGV[1 + CALL_EPOCH_CANDIDATE]

-- The reply to an item its attempt may not write: 'fenced', unless it is a finish that already happened.
local function refused(k, state, attempt, finish, last_seq, final_seq)
  local status, current = state[1], state[2]
  local code = 'fenced'
  if finish and current == attempt and status and last_seq >= final_seq
     and status ~= 'running' and status ~= 'queued' then
    code = 'ok'  -- a finish retried after an ambiguous failure: it already happened
  end
  local head = redis.call('LINDEX', KEYS[k + KEY_QUEUE], 0) or ''
  return {code, '', '', tostring(last_seq), state[4] or '', head, status or ''}
end

-- Appends an item's events (from ARGV[first]), skipping those stored already, and publishes each; adds
-- what they change to the hash `fields`. An event that restarts the generation clears its text, reasoning
-- and tool calls, here, where it is appended: no reader ever sees the restart with the dead attempt's
-- output still stored. Returns the code ('ok' or 'gap'), the epoch, the newest entry id and the last seq
-- stored.
local function append(k, first, count, last_seq, fields)
  local events, meta, live = KEYS[k + KEY_EVENTS], KEYS[k + KEY_META], KEYS[k + KEY_LIVE]
  local epoch, prev = ensure_epoch(meta, candidate, now_ms)
  local start, code = prev, 'ok'
  local texts, reasonings = {}, {}
  for at = first, first + (count - 1) * EVENT_SIZE, EVENT_SIZE do
    local seq = tonumber(ARGV[at + EVENT_SEQ])
    if seq == last_seq + 1 then
      local body = ARGV[at + EVENT_BODY]
      local id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'e', epoch, 'p', prev, 'd', body)
      redis.call('SPUBLISH', live, epoch .. ' ' .. prev .. ' ' .. id .. ' ' .. body)
      if ARGV[at + EVENT_RESTARTS] == '1' then
        texts, reasonings = {}, {}
        redis.call('DEL', KEYS[k + KEY_TEXT], KEYS[k + KEY_REASONING])
        redis.call('HDEL', KEYS[k + KEY_GEN], 'tool_calls')
      end
      if ARGV[at + EVENT_TEXT] ~= '' then texts[#texts + 1] = ARGV[at + EVENT_TEXT] end
      if ARGV[at + EVENT_REASONING] ~= '' then reasonings[#reasonings + 1] = ARGV[at + EVENT_REASONING] end
      if last_seq == 0 then
        fields[#fields + 1] = 'first_offset'
        fields[#fields + 1] = epoch .. ':' .. id
      end
      prev = id
      last_seq = seq
    elseif seq > last_seq + 1 then
      code = 'gap'
      break
    end
  end
  if #texts > 0 then redis.call('APPEND', KEYS[k + KEY_TEXT], table.concat(texts)) end
  if #reasonings > 0 then redis.call('APPEND', KEYS[k + KEY_REASONING], table.concat(reasonings)) end
  if prev ~= start then redis.call('HSET', meta, 'last', prev) end
  return code, epoch, prev, last_seq
end

-- Adds a finish's fields (from ARGV[fin]) to the hash `fields`.
local function finished(fin, fields)
  local values = {'status', ARGV[fin + FINISH_STATUS], 'finish_reason', ARGV[fin + FINISH_FINISH_REASON],
    'finished_ms', now_ms}
  for _, value in ipairs(values) do fields[#fields + 1] = value end
  local usage, failure = ARGV[fin + FINISH_USAGE], ARGV[fin + FINISH_ERROR]
  if usage ~= '' then fields[#fields + 1] = 'usage'; fields[#fields + 1] = usage end
  if failure ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = failure end
end

-- Ends a finished generation's place in its session: its lease and queue place go, every key of the item
-- lives `ttl` more seconds. Returns the session's next head ('' for none).
local function hand_over(k, gid)
  local queue = KEYS[k + KEY_QUEUE]
  redis.call('HDEL', KEYS[k + KEY_GEN], 'lease_until_ms')
  redis.call('LREM', queue, 1, gid)
  local head = redis.call('LINDEX', queue, 0) or ''
  for offset = 0, KEY_SIZE - 1 do
    if offset ~= KEY_LIVE then redis.call('EXPIRE', KEYS[k + offset], ttl) end
  end
  return head
end

local results = {}
local a = 1 + CALL_SIZE
for i = 1, tonumber(ARGV[1 + CALL_ITEM_COUNT]) do
  local k = 1 + (i - 1) * KEY_SIZE
  local mode, attempt, gid = ARGV[a + HEAD_MODE], ARGV[a + HEAD_ATTEMPT], ARGV[a + HEAD_GENERATION_ID]
  local count, tool_calls = tonumber(ARGV[a + HEAD_EVENT_COUNT]), ARGV[a + HEAD_TOOL_CALLS]
  local first = a + HEAD_SIZE
  local fin, finish = first + count * EVENT_SIZE, mode == MODE_FINISH
  a = finish and fin + FINISH_SIZE or fin
  -- One read and one write of each hash per item, whatever the number of events: at one token per event
  -- (a slow model, a short flush window) the bookkeeping would otherwise outnumber the appends.
  local gen = KEYS[k + KEY_GEN]
  local state = redis.call('HMGET', gen, 'status', 'attempt', 'seq', 'cancel_requested')
  local status, last_seq = state[1], tonumber(state[3] or '0')
  if state[2] ~= attempt or not (status == 'running' or (finish and status == 'queued')) then
    local final_seq = count > 0 and tonumber(ARGV[fin - EVENT_SIZE + EVENT_SEQ]) or last_seq
    results[i] = refused(k, state, attempt, finish, last_seq, final_seq)
  else
    local fields = {}
    local code, epoch, prev, seq = append(k, first, count, last_seq, fields)
    fields[#fields + 1] = 'seq'
    fields[#fields + 1] = seq
    if tool_calls ~= '' and code == 'ok' then
      fields[#fields + 1] = 'tool_calls'
      fields[#fields + 1] = tool_calls
    end
    if prev ~= '0-0' then
      fields[#fields + 1] = 'last_offset'
      fields[#fields + 1] = epoch .. ':' .. prev
    end
    local finishing, head = finish and code == 'ok', ''
    if finishing then finished(fin, fields) end
    redis.call('HSET', gen, unpack(fields))
    if finishing then
      head = hand_over(k, gid)
      status = ARGV[fin + FINISH_STATUS]
    end
    local cancel = state[4] or ''
    if code == 'ok' and cancel == '' and head == '' and status == 'running' then
      results[i] = epoch .. ' ' .. prev .. ' ' .. tostring(seq)  -- nearly every reply: one string to read back
    else
      results[i] = {code, epoch, prev, tostring(seq), cancel, head, status}
    end
  end
end
return results
