-- Read one generation whole: its record, text and reasoning as of one instant (a script runs alone).
-- KEYS: gen, text, reasoning
-- ARGV: none
-- Reply: {record fields as field, value pairs (empty when it does not exist), text, reasoning}
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or '', redis.call('GET', KEYS[3]) or ''}
