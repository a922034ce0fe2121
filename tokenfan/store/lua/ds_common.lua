-- Helpers of the Durable Streams scripts, prepended to each of them when it is loaded (see scripts.py).

-- The id of the next entry after `last` ('<ms>-<seq>'): the server's clock when it has moved on, else the
-- next seq of the same millisecond. Computed rather than left to XADD '*', because a fork's first entry
-- must follow its fork offset, which the fork's own Redis stream has never held.
local function next_id(last)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  if now > tonumber(ms) then return string.format('%d-0', now) end
  return ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end

-- Kafka-style producer check: {'accept', proposed state} or the refusal with its numbers.
local function check_producer(producers, pid, epoch, seq)
  local held = redis.call('HGET', producers, pid)
  if not held then
    if seq ~= 0 then return {'gap', 0, seq} end
    return {'accept', epoch .. ' 0'}
  end
  local held_epoch, held_seq = string.match(held, '^(%d+) (%d+)$')
  held_epoch, held_seq = tonumber(held_epoch), tonumber(held_seq)
  if epoch < held_epoch then return {'stale', held_epoch} end
  if epoch > held_epoch then
    if seq ~= 0 then return {'bad_epoch_seq'} end
    return {'accept', epoch .. ' 0'}
  end
  if seq <= held_seq then return {'dup', held_seq} end
  if seq == held_seq + 1 then return {'accept', epoch .. ' ' .. string.format('%d', seq)} end
  return {'gap', held_seq + 1, seq}
end

-- Sliding TTL or fixed expiry, applied to every key of the stream (those that exist).
local function apply_expiry(meta, keys)
  local held = redis.call('HMGET', meta, 'ttl', 'expires_ms')
  for _, key in ipairs(keys) do
    if held[1] and held[1] ~= '' then
      redis.call('PEXPIRE', key, tonumber(held[1]) * 1000)
    elseif held[2] and held[2] ~= '' then
      redis.call('PEXPIREAT', key, held[2])
    end
  end
end
