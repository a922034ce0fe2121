-- Renew (or release) the lease of one running attempt.
-- KEYS: gen
-- ARGV: attempt, lease deadline ms (0 releases it: the next start restarts the generation at once)
-- Reply: {code, cancellation reason ('' for none)}; code is 'renewed', or 'fenced' (the attempt lost the
--   generation: another attempt runs it, or it ended; nothing was written).
local gen = KEYS[1]
local state = redis.call('HMGET', gen, 'attempt', 'status', 'cancel_requested')
if state[1] ~= ARGV[1] or state[2] ~= 'running' then
  return {'fenced', ''}
end
redis.call('HSET', gen, 'lease_until_ms', ARGV[2])
return {'renewed', state[3] or ''}
