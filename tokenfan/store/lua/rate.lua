-- Take one request from a GCRA allowance.
-- KEYS: the limiter
-- ARGV: now_ms, emission interval ms, burst (requests)
-- Reply: 0 when allowed, else the milliseconds to wait (nothing is taken then).
local now, interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local allowed_at = tat + interval - burst * interval
if allowed_at > now then return allowed_at - now end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now) + 1000)
return 0
