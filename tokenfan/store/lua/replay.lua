-- What an Idempotency-Key already stands for, before anything of a request is taken or written.
-- KEYS: idempotency, queue, meta
-- ARGV: the digest of the request and its policy
-- Reply: {code, generation id, queue position (0 = not queued), epoch}; code is 'new' (an unknown key: the
--   caller accepts the request), 'duplicate' (the same request: the generation it was given), or 'reused'
--   (the key came with another request). Reads only.
local idem, queue, meta = KEYS[1], KEYS[2], KEYS[3]
local existing, same = idempotent(idem, ARGV[1])
if existing == '' then return {'new', '', '0', ''} end
if not same then return {'reused', existing, '0', ''} end
local at = redis.call('LPOS', queue, existing)
return {'duplicate', existing, at and tostring(at + 1) or '0', redis.call('HGET', meta, 'epoch') or ''}
