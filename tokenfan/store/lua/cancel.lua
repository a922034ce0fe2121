-- Ask for a queued or running generation to be cancelled, and tell every worker.
-- KEYS: gen
-- ARGV: reason, cancellation channel (global: workers listen to it), generation id
-- Reply: the generation's status as found ('' when it does not exist). Only the first request of a
--   generation is recorded and published; a finished one is left as it is.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if (status == 'queued' or status == 'running') and not redis.call('HGET', KEYS[1], 'cancel_requested') then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. ARGV[1])
end
return status
