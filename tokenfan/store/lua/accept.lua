-- Accept a generation at the back of its session's queue, or refuse it, per policy.
-- KEYS: meta, gen, queue, generations, events, idempotency (a per-session name even when unused),
--       and with policy 'interrupt' on a busy session: the hash of the generation at the queue's head
-- ARGV: now_ms, epoch candidate, ttl, generation id, request json, model, policy, generations kept,
--       idempotency ttl (0 = no idempotency key), cancellation channel,
--       the queue's head as the caller read it ('' for an empty queue; only read for policy 'interrupt'),
--       the digest of the request and its policy (compared with the one an idempotency key was given with)
-- Reply: {code, generation id, queue position (0 = not queued), epoch}; code is
--   'accepted', 'duplicate' (the generation id is the earlier one), 'reused' (the idempotency key came with
--   another request; the generation id is the one it was given; nothing was written), 'conflict' (policy
--   'reject' on a busy session; the generation id is the head's), or 'stale' (policy 'interrupt': the head
--   is no longer the one the caller read; the generation id is the head now, '' for none; nothing was
--   written).
local meta, gen, queue, generations, events, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now_ms, candidate, ttl, gid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local request, model, policy, keep = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local idem_ttl, channel, read_head, digest = tonumber(ARGV[9]), ARGV[10], ARGV[11], ARGV[12]
local function position(id)
  local at = redis.call('LPOS', queue, id)
  if at then return tostring(at + 1) end
  return '0'
end
local existing, same = '', true
if idem_ttl > 0 then existing, same = idempotent(idem, digest) end
if not same then return {'reused', existing, '0', ''} end
if existing == '' and redis.call('EXISTS', gen) == 1 then existing = gid end  -- this very call, retried
if existing ~= '' then
  return {'duplicate', existing, position(existing), redis.call('HGET', meta, 'epoch') or ''}
end
local queued = redis.call('LLEN', queue)
if policy == 'reject' and queued > 0 then
  return {'conflict', redis.call('LINDEX', queue, 0), '0', ''}
end
local head = false
if policy == 'interrupt' and queued > 0 then
  head = redis.call('LINDEX', queue, 0)
end
if policy == 'interrupt' and (head or '') ~= read_head then
  -- The caller named the head's hash in KEYS from what it read; that is not the head any more.
  return {'stale', head or '', '0', ''}
end
local epoch = ensure_epoch(meta, candidate, now_ms)
redis.call('HSET', gen, 'status', 'queued', 'attempt', 0, 'seq', 0, 'request', request, 'model', model,
  'created_ms', now_ms)
local at = queued + 1
if head then
  -- The head (running, or about to run) is cancelled; this one runs right after it.
  local head_gen = KEYS[7]
  if not redis.call('HGET', head_gen, 'cancel_requested') then
    redis.call('HSET', head_gen, 'cancel_requested', 'interrupted')
    redis.call('PUBLISH', channel, head .. ' interrupted')
  end
  redis.call('LINSERT', queue, 'AFTER', head, gid)
  at = 2
else
  redis.call('RPUSH', queue, gid)
end
redis.call('RPUSH', generations, gid)
redis.call('LTRIM', generations, -keep, -1)
if idem_ttl > 0 then redis.call('SET', idem, gid .. ' ' .. digest, 'EX', idem_ttl) end
for _, key in ipairs({meta, gen, queue, generations}) do redis.call('EXPIRE', key, ttl) end
if redis.call('EXISTS', events) == 1 then redis.call('EXPIRE', events, ttl) end
return {'accepted', gid, tostring(at), epoch}
