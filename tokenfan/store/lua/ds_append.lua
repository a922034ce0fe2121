-- Append to a Durable Streams stream, and/or close it; the idempotent producer and Stream-Seq checks first.
-- KEYS: meta, events, producers, live (the channel the live tail hears)
-- ARGV: ctn (the request's media type; '' for a close without data), data ('' for none), close ('1' or ''),
--       stream seq ('' for none), producer id ('' for none), producer epoch, producer seq
-- Reply: {code, tail, ...}: 'ok' tail; 'missing'; 'gone' (deleted, its forks still read it); 'closed' tail
--   (or 'dup_closed' tail seq: the very request that closed it, retried); 'ct_mismatch'; 'seq_conflict';
--   and the producer refusals 'dup' tail seq, 'stale' tail epoch, 'bad_epoch_seq', 'gap' tail expected got.
-- Each entry is published as a session's are: '<epoch> <previous id> <id> <data>'.
local meta, events, producers, live = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ctn, data, close, wseq = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local pid, pepoch, pseq = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local m = redis.call('HMGET', meta, 'epoch', 'last', 'tail', 'ctn', 'closed', 'closed_by', 'wseq', 'deleted')
local epoch, last, tail = m[1], m[2], m[3]
if not epoch then return {'missing'} end
if m[8] == '1' then return {'gone'} end
if m[5] == '1' then
  if pid ~= '' and m[6] == pid .. ' ' .. ARGV[6] .. ' ' .. ARGV[7] then return {'dup_closed', tail, ARGV[7]} end
  return {'closed', tail}
end
if data ~= '' and ctn ~= m[4] then return {'ct_mismatch'} end
local proposed = nil
if pid ~= '' then
  local verdict = check_producer(producers, pid, pepoch, pseq)
  if verdict[1] ~= 'accept' then
    local reply = {verdict[1], tail}
    for i = 2, #verdict do reply[#reply + 1] = tostring(verdict[i]) end
    return reply
  end
  proposed = verdict[2]
end
if wseq ~= '' and m[7] and wseq <= m[7] then return {'seq_conflict'} end
local function add(body)
  local id = next_id(last)
  redis.call('XADD', events, id, 'e', epoch, 'p', last, 'd', body)
  redis.call('SPUBLISH', live, epoch .. ' ' .. last .. ' ' .. id .. ' ' .. body)
  last = id
  return id
end
local fields = {}
if data ~= '' then
  tail = add(data)
  fields = {'tail', tail}
end
if proposed then redis.call('HSET', producers, pid, proposed) end
if wseq ~= '' then fields[#fields + 1] = 'wseq'; fields[#fields + 1] = wseq end
if close then
  add('')
  fields[#fields + 1] = 'closed'
  fields[#fields + 1] = '1'
  if pid ~= '' then
    fields[#fields + 1] = 'closed_by'
    fields[#fields + 1] = pid .. ' ' .. ARGV[6] .. ' ' .. ARGV[7]
  end
end
fields[#fields + 1] = 'last'
fields[#fields + 1] = last
redis.call('HSET', meta, unpack(fields))
apply_expiry(meta, {meta, events, producers})
return {'ok', tail}
