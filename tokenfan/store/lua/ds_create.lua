-- Create a Durable Streams stream (the caller compared an existing one's configuration already).
-- KEYS: meta, events, producers, live
-- ARGV: now_ms, epoch candidate, then field/value pairs count n, n*2 meta fields (ct, ctn, ttl, expires_at,
--       expires_ms, fork_of, fork_offset, fork_sub, owner), the last id before the stream's own messages
--       ('0-0', or a fork's offset), closed ('1' or ''), then copied entries (a fork's inherited messages
--       up to its offset): count m, m x (id, predecessor, data); then the stream's own first messages (a
--       fork's sub-offset prefix, the body of the PUT): count k, k x data.
-- Reply: {'created', tail} or {'exists'}.
local meta, events, producers, live = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', meta) == 1 then return {'exists'} end
local epoch = ARGV[2]
local n = tonumber(ARGV[3])
local fields = {'epoch', epoch, 'created_ms', ARGV[1]}
for i = 4, 3 + n * 2 do fields[#fields + 1] = ARGV[i] end
local a = 4 + n * 2
local last, closed = ARGV[a], ARGV[a + 1]
local m = tonumber(ARGV[a + 2])
a = a + 3
for _ = 1, m do
  redis.call('XADD', events, ARGV[a], 'e', epoch, 'p', ARGV[a + 1], 'd', ARGV[a + 2])
  a = a + 3
end
for i = a + 1, a + tonumber(ARGV[a]) do
  local id = next_id(last)
  redis.call('XADD', events, id, 'e', epoch, 'p', last, 'd', ARGV[i])
  last = id
end
local tail = last
if closed == '1' then
  local id = next_id(last)
  redis.call('XADD', events, id, 'e', epoch, 'p', last, 'd', '')
  last = id
  fields[#fields + 1] = 'closed'
  fields[#fields + 1] = '1'
end
fields[#fields + 1] = 'last'
fields[#fields + 1] = last
fields[#fields + 1] = 'tail'
fields[#fields + 1] = tail
redis.call('HSET', meta, unpack(fields))
apply_expiry(meta, {meta, events, producers})
return {'created', tail}
