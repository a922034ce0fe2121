-- A Durable Streams stream's metadata, renewing its sliding TTL when the read counts as an access.
-- KEYS: meta, events, producers
-- ARGV: touch ('1': a read or an append; '' for HEAD)
-- Reply: the meta hash as field/value pairs (empty: no such stream).
local meta = KEYS[1]
if ARGV[1] == '1' and redis.call('HEXISTS', meta, 'ttl') == 1 then apply_expiry(meta, KEYS) end
return redis.call('HGETALL', meta)
