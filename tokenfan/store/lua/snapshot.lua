-- A session's generations, consistent with its stream: all of them, or those with events after an entry id.
-- KEYS: meta, generations, queue, then per generation id in ARGV: its hash, its text, its reasoning
-- ARGV: since (an entry id; '' for every retained generation), then the ids the caller read from the end of
--       the generations list, oldest first (with since '': the whole list)
-- Reply: {code, epoch, newest entry id, then per generation: id, hash fields, text, reasoning}, oldest first;
--   code is 'ok', 'stale' (the list changed in a way that matters: read it again), or 'more' (since: the
--   list holds older generations than those given, and they may have events after it: give more).
-- Generations accepted after the caller read the list are left out while they wait behind the queue's
-- head: they have no event yet, so the snapshot is the session as it was just before they arrived.
-- Generations run one after another, so walking back from the newest stops at the first finished one that
-- ended at or before since.
local meta, generations, queue, since = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local count = #ARGV - 1
local listed = redis.call('LRANGE', generations, 0, -1)
local last_given = 0  -- where the last id given sits in the list (0: none given)
if count > 0 then
  last_given = #listed
  while last_given > 0 and listed[last_given] ~= ARGV[count + 1] do last_given = last_given - 1 end
end
local first_given = last_given - count + 1
if first_given < 1 or (since == '' and first_given ~= 1) then return {'stale'} end
for i = 1, count do
  if listed[first_given + i - 1] ~= ARGV[i + 1] then return {'stale'} end
end
for i = last_given + 1, #listed do
  local at = redis.call('LPOS', queue, listed[i])
  if not at or at == 0 then return {'stale'} end  -- it may have run: its events would be missing
end
local complete = since == '' or first_given == 1
local picked = {}
for i = count, 1, -1 do
  local gen, text, reasoning = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
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
