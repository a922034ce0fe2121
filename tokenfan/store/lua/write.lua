-- Append events (and finish) for many generations in one call: one item per generation.
-- Prepended at load time: common.lua, then the layout's offsets (write_layout.py generates them, from the
-- same NamedTuples whose instances the caller puts in KEYS and ARGV):
-- KEYS: per item, ItemKeys: events, meta, gen, text, queue, generations, reasoning, live (the channel)
-- ARGV: WriteCall: now_ms, maxlen, ttl, epoch candidate, item count; then per item:
--       ItemHead: mode ('A' append | 'F' finish), attempt, generation id, event count, tool calls json
--       ('' = unchanged); event count x EventWrite: seq, body, text piece, reasoning piece;
--       and for 'F' a FinishArgs: status, finish_reason, usage json, error json
-- Reply: per item {code, epoch, newest entry id, last seq, cancel reason, next head, status}; code is 'ok',
--   'fenced' (not this attempt's to write: restarted elsewhere, or ended), or 'gap' (a seq was skipped).
-- Each appended entry is published on the session's channel as '<epoch> <previous id> <id> <body>'.
local now_ms, maxlen = ARGV[1 + CALL_NOW_MS], ARGV[1 + CALL_MAXLEN]
local ttl, candidate = tonumber(ARGV[1 + CALL_TTL]), ARGV[1 + CALL_EPOCH_CANDIDATE]
local items = tonumber(ARGV[1 + CALL_ITEM_COUNT])
local a = 1 + CALL_SIZE
local results = {}
for i = 1, items do
  local k = 1 + (i - 1) * KEY_SIZE
  local events, meta, gen = KEYS[k + KEY_EVENTS], KEYS[k + KEY_META], KEYS[k + KEY_GEN]
  local text, reasoning, live = KEYS[k + KEY_TEXT], KEYS[k + KEY_REASONING], KEYS[k + KEY_LIVE]
  local queue, generations = KEYS[k + KEY_QUEUE], KEYS[k + KEY_GENERATIONS]
  local mode, attempt, gid = ARGV[a + HEAD_MODE], ARGV[a + HEAD_ATTEMPT], ARGV[a + HEAD_GENERATION_ID]
  local count, tool_calls = tonumber(ARGV[a + HEAD_EVENT_COUNT]), ARGV[a + HEAD_TOOL_CALLS]
  local first_event = a + HEAD_SIZE
  a = first_event + count * EVENT_SIZE
  local fin, finish = a, mode == MODE_FINISH
  if finish then a = a + FINISH_SIZE end
  -- One read and one write of each hash per item, whatever the number of events: at one token per event
  -- (a slow model, a short flush window) the bookkeeping would otherwise outnumber the appends.
  local state = redis.call('HMGET', gen, 'status', 'attempt', 'seq', 'cancel_requested')
  local status, current = state[1], state[2]
  local last_seq = tonumber(state[3] or '0')
  local last_event = first_event + (count - 1) * EVENT_SIZE
  local final_seq = count > 0 and tonumber(ARGV[last_event + EVENT_SEQ]) or last_seq
  local writable = current == attempt and (status == 'running' or (finish and status == 'queued'))
  local cancel = state[4] or ''
  if not writable then
    local code = 'fenced'
    if finish and current == attempt and status and last_seq >= final_seq
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
      local at = first_event + j * EVENT_SIZE
      local seq = tonumber(ARGV[at + EVENT_SEQ])
      if seq == last_seq + 1 then
        local body = ARGV[at + EVENT_BODY]
        local id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'e', epoch, 'p', prev, 'd', body)
        redis.call('PUBLISH', live, epoch .. ' ' .. prev .. ' ' .. id .. ' ' .. body)
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
    local finishing = finish and code == 'ok'
    if finishing then
      local finished = {'status', ARGV[fin + FINISH_STATUS],
        'finish_reason', ARGV[fin + FINISH_FINISH_REASON], 'finished_ms', now_ms}
      for _, value in ipairs(finished) do fields[#fields + 1] = value end
      local usage, failure = ARGV[fin + FINISH_USAGE], ARGV[fin + FINISH_ERROR]
      if usage ~= '' then fields[#fields + 1] = 'usage'; fields[#fields + 1] = usage end
      if failure ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = failure end
    end
    redis.call('HSET', gen, unpack(fields))
    if finishing then
      redis.call('HDEL', gen, 'lease_until_ms')
      redis.call('LREM', queue, 1, gid)
      head = redis.call('LINDEX', queue, 0) or ''
      for _, key in ipairs({events, meta, gen, text, queue, generations, reasoning}) do
        redis.call('EXPIRE', key, ttl)
      end
      status = ARGV[fin + FINISH_STATUS]
    end
    results[i] = {code, epoch, prev, tostring(last_seq), cancel, head, status}
  end
end
return results
