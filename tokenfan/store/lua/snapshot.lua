-- A session's generations, consistent with its stream: all of them, or those with events after an entry id.
-- KEYS: meta, generations, then per generation id in ARGV: its hash, its text, its reasoning
-- ARGV: since (an entry id; '' for every retained generation), then the ids the caller read from the end of
--       the generations list, oldest first (with since '': the whole list)
-- Reply: {code, epoch, newest entry id, then per generation: id, hash fields, text, reasoning}, oldest first;
--   code is 'ok', 'stale' (the list does not end with the ids given: read them again), or 'more' (since:
--   the list holds older generations than those given, and they may have events after it: give more).
-- Generations run one after another, so walking back from the newest stops at the first finished one that
-- ended at or before since.
local meta, generations, since = KEYS[1], KEYS[2], ARGV[1]
local count = #ARGV - 1
local length = redis.call('LLEN', generations)
local tail = {}
if count > 0 then tail = redis.call('LRANGE', generations, -count, -1) end
if #tail ~= count or (since == '' and length ~= count) then return {'stale'} end
for i = 1, count do
  if tail[i] ~= ARGV[i + 1] then return {'stale'} end
end
local complete = since == '' or length == count
local picked = {}
for i = count, 1, -1 do
  local gen, text, reasoning = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local fields = redis.call('HGETALL', gen)
  if #fields > 0 then
    local state = redis.call('HMGET', gen, 'last_offset', 'status')
    local last_offset = state[1]
    if since ~= '' and last_offset and not id_before(since, string.match(last_offset, ':([^:]+)$')) then
      if state[2] ~= 'queued' and state[2] ~= 'running' then
        complete = true
        break
      end
    elseif since == '' or last_offset then
      local texts = {redis.call('GET', text) or '', redis.call('GET', reasoning) or ''}
      table.insert(picked, 1, {ARGV[i + 1], fields, texts[1], texts[2]})
    end
  end
end
if not complete then return {'more'} end
local position = redis.call('HMGET', meta, 'epoch', 'last')
local out = {'ok', position[1] or '', position[2] or '0-0'}
for _, item in ipairs(picked) do
  for j = 1, 4 do out[#out + 1] = item[j] end
end
return out
