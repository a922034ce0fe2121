-- Helpers shared by several scripts, prepended to each of them when it is loaded (see scripts.py).

-- The stream's epoch and its newest entry id ('0-0' for none); the first call on a session creates the
-- epoch from the candidate.
local function ensure_epoch(meta, candidate, now_ms)
  local held = redis.call('HMGET', meta, 'epoch', 'last')
  if not held[1] then
    redis.call('HSET', meta, 'epoch', candidate, 'created_ms', now_ms, 'last', '0-0')
    return candidate, '0-0'
  end
  return held[1], held[2] or '0-0'
end

-- Whether stream id a ('<ms>-<seq>', as Redis writes them: no leading zeros) comes before stream id b.
-- Compared as digit strings, so ids beyond 2^53 (Lua numbers are doubles) still compare exactly.
local function id_before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if a_ms == b_ms then a_ms, b_ms = a_seq, b_seq end
  if #a_ms ~= #b_ms then return #a_ms < #b_ms end
  return a_ms < b_ms
end

-- The generation an Idempotency-Key was given ('' for an unknown key), and whether `digest` is the digest of
-- the request it came with (true for an unknown key). The key holds '<generation id> <digest>'; one stored
-- without a digest (before requests were compared) matches any request.
local function idempotent(idem, digest)
  local held = redis.call('GET', idem)
  if not held then return '', true end
  local gid, was = string.match(held, '^(%S+) ?(%S*)$')
  return gid, was == '' or was == digest
end
