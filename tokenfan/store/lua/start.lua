-- Take a generation for an attempt: hand out the attempt number and a lease.
-- KEYS: gen, queue
-- ARGV: now_ms, lease ms, max attempts, start token (unique per job run: a retry of this very call returns
--       the same attempt instead of taking another one), generation id
-- Reply: {code, attempt (for 'busy': the ms the live lease has left), last seq, request json, cancel reason};
--   code is 'started', 'restarted' (an earlier attempt's lease ran out), 'exhausted' (too many attempts),
--   'busy' (another attempt holds a live lease), 'terminal' (already ended), 'missing', or 'waiting'
--   (queued behind another generation of its session).
local gen, queue = KEYS[1], KEYS[2]
local now_ms, lease_ms, max_attempts, token = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local status = redis.call('HGET', gen, 'status')
if not status then return {'missing', '0', '0', '', ''} end
if status ~= 'queued' and status ~= 'running' then return {'terminal', '0', '0', '', ''} end
if status == 'queued' and redis.call('LINDEX', queue, 0) ~= ARGV[5] then
  return {'waiting', '0', '0', '', ''}  -- its turn has not come: the generation ahead enqueues it when done
end
local attempt = tonumber(redis.call('HGET', gen, 'attempt') or '0')
local function taken()
  local code = 'started'
  if attempt > max_attempts then code = 'exhausted' elseif attempt > 1 then code = 'restarted' end
  local held = redis.call('HMGET', gen, 'seq', 'request', 'cancel_requested')
  return {code, tostring(attempt), held[1] or '0', held[2] or '', held[3] or ''}
end
if status == 'running' and redis.call('HGET', gen, 'start_token') == token then
  return taken()
end
local lease = tonumber(redis.call('HGET', gen, 'lease_until_ms') or '0')
if status == 'running' and lease > now_ms then
  return {'busy', tostring(lease - now_ms), '0', '', ''}
end
attempt = redis.call('HINCRBY', gen, 'attempt', 1)
redis.call('HSET', gen, 'status', 'running', 'lease_until_ms', now_ms + lease_ms, 'start_token', token)
if status == 'queued' then redis.call('HSET', gen, 'started_ms', now_ms) end
return taken()
