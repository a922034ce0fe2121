-- Where subscribers may resume: offsets (epoch and entry id) checked against the session's stream, one or
-- several at once (the resumers of one session that asked together).
-- KEYS: meta, events
-- ARGV: each offset's epoch and entry id, in pairs
-- Reply: a verdict per offset, in order: 'retained' (resume after it: it is in the stream, or it is the
--   newest trimmed entry and everything after it is still here), 'other_epoch' (it belongs to an earlier
--   incarnation of the stream, or the session is gone), 'trimmed' (entries after it were trimmed), or
--   'unknown' (the stream never had it).
local meta, events = KEYS[1], KEYS[2]
local current = redis.call('HGET', meta, 'epoch') or ''
local before_oldest = nil  -- the predecessor of the oldest entry retained ('0-0' if none was trimmed), once
local known = {}  -- verdicts by offset: resumers often hold the same one
local verdicts = {}
for i = 1, #ARGV, 2 do
  local epoch, held = ARGV[i], ARGV[i + 1]
  local key = epoch .. ':' .. held
  local verdict = known[key]
  if not verdict then
    if current ~= epoch then
      verdict = 'other_epoch'
    elseif #redis.call('XRANGE', events, held, held) > 0 then
      verdict = 'retained'
    else
      if not before_oldest then
        before_oldest = '0-0'
        local first = redis.call('XRANGE', events, '-', '+', 'COUNT', 1)[1]
        if first then
          for j = 1, #first[2], 2 do
            if first[2][j] == 'p' then before_oldest = first[2][j + 1] end
          end
        end
      end
      if held == before_oldest and held ~= '0-0' then
        verdict = 'retained'
      elseif id_before(held, before_oldest) then
        verdict = 'trimmed'
      else
        verdict = 'unknown'  -- beyond the newest entry, or between two entries
      end
    end
    known[key] = verdict
  end
  verdicts[#verdicts + 1] = verdict
end
return verdicts
