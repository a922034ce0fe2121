-- Append apps' events (an `x.` type each) to a session, in its order, as the pseudo-generation 'app'.
-- KEYS: events, meta, app (its seq), live (the channel), producers
-- ARGV: now_ms, epoch candidate, maxlen, ttl, producer id ('' for none), producer epoch, producer seq,
--       event count, then per event: the body up to its seq, the body after it
-- Reply: {'ok', epoch, newest id} or a producer refusal as in ds_append.lua ({'dup', epoch, last id, seq}...).
-- The entry names its predecessor and moves the session's 'last' exactly as the write script does, and both
-- run atomically in the session's slot: a generation's writes and apps' events interleave only between
-- whole writes, and every relay's predecessor check holds across them.
local events, meta, app, live, producers = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now_ms, candidate, maxlen, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local pid, pepoch, pseq = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local epoch, prev = ensure_epoch(meta, candidate, now_ms)
if pid ~= '' then
  local verdict = check_producer(producers, pid, pepoch, pseq)
  if verdict[1] ~= 'accept' then
    local reply = {verdict[1], epoch, prev}
    for i = 2, #verdict do reply[#reply + 1] = tostring(verdict[i]) end
    return reply
  end
  redis.call('HSET', producers, pid, verdict[2])
  redis.call('EXPIRE', producers, ttl)
end
local seq = tonumber(redis.call('HGET', app, 'seq') or '0')
local a = 9
for _ = 1, tonumber(ARGV[8]) do
  seq = seq + 1
  local body = ARGV[a] .. string.format('%d', seq) .. ARGV[a + 1]
  local id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'e', epoch, 'p', prev, 'd', body)
  redis.call('SPUBLISH', live, epoch .. ' ' .. prev .. ' ' .. id .. ' ' .. body)
  prev = id
  a = a + 2
end
redis.call('HSET', app, 'seq', seq)
redis.call('HSET', meta, 'last', prev)
for _, key in ipairs({events, meta, app}) do redis.call('EXPIRE', key, ttl) end
return {'ok', epoch, prev}
