-- One page of a session's stream, after an entry id.
-- KEYS: events
-- ARGV: exclusive start id, count, strict (1: the page must follow on from the start id)
-- Reply: {'ok', entries} or {'gone'} (strict, and entries after the start id were trimmed). Each entry names
--   its predecessor in its field 'p': the page follows on iff its first entry's predecessor is the start.
local page = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
if ARGV[3] == '1' and #page > 0 then
  local fields = page[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and fields[i + 1] ~= ARGV[1] then return {'gone'} end
  end
end
return {'ok', page}
