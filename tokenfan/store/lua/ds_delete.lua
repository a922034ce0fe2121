-- Delete a Durable Streams stream, or release one fork's hold on it.
-- KEYS: meta, events, producers
-- ARGV: mode ('delete': the client's DELETE; 'release': a fork of it went away; 'retain': a fork is made)
-- Reply: {code, fork_of}: 'deleted' (keys removed), 'soft' (forks still read it: it answers 410 until the
--   last goes), 'kept' (released or retained, still there), 'missing', 'gone' (already deleted, for DELETE
--   and 'retain').
local meta, mode = KEYS[1], ARGV[1]
local m = redis.call('HMGET', meta, 'epoch', 'forks', 'deleted', 'fork_of')
if not m[1] then return {'missing', ''} end
local forks, fork_of = tonumber(m[2] or '0'), m[4] or ''
if mode == 'retain' then
  if m[3] == '1' then return {'gone', ''} end
  redis.call('HINCRBY', meta, 'forks', 1)
  return {'kept', ''}
end
if mode == 'delete' then
  if m[3] == '1' then return {'gone', ''} end
elseif mode == 'release' then
  forks = forks - 1
  redis.call('HSET', meta, 'forks', forks)
  if m[3] ~= '1' then return {'kept', ''} end
end
if forks > 0 then
  redis.call('HSET', meta, 'deleted', '1')
  return {'soft', ''}
end
redis.call('DEL', unpack(KEYS))
return {'deleted', fork_of}
