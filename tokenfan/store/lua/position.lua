-- Where a subscriber may resume: an offset (epoch and entry id) checked against the session's stream.
-- KEYS: meta, events
-- ARGV: the offset's epoch, its entry id
-- Reply: 'retained' (resume after it: it is in the stream, or it is the newest trimmed entry and everything
--   after it is still here), 'other_epoch' (it belongs to an earlier incarnation of the stream, or the
--   session is gone), 'trimmed' (entries after it were trimmed), or 'unknown' (the stream never had it).
local meta, events, epoch, held = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if (redis.call('HGET', meta, 'epoch') or '') ~= epoch then return 'other_epoch' end
if #redis.call('XRANGE', events, held, held) > 0 then return 'retained' end
local first = redis.call('XRANGE', events, '-', '+', 'COUNT', 1)[1]
local before_oldest = '0-0'  -- the predecessor of the oldest entry retained: '0-0' if none was trimmed
if first then
  for i = 1, #first[2], 2 do
    if first[2][i] == 'p' then before_oldest = first[2][i + 1] end
  end
end
if held == before_oldest and held ~= '0-0' then return 'retained' end
if id_before(held, before_oldest) then return 'trimmed' end
return 'unknown'  -- beyond the newest entry, or between two entries
