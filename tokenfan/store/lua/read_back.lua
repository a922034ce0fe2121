-- A run of a session's stream read backwards, flattened for the relay's catch-up history.
-- KEYS: events
-- ARGV: the newest id to read (inclusive), count
-- Reply: {id, predecessor, epoch, body, id, predecessor, epoch, body, ...}, oldest entry first: four values
--   per entry and no nested list or field names, so the relay parses a page without building a dict (or a
--   list) per entry (redis-py's XREVRANGE reply callback does; it was a third of the relay's work in a storm).
local page = redis.call('XREVRANGE', KEYS[1], ARGV[1], '-', 'COUNT', ARGV[2])
local flat = {}
local n = 0
for i = #page, 1, -1 do
  local entry = page[i]
  local fields = entry[2]
  local p, e, d
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name == 'p' then p = fields[j + 1] elseif name == 'e' then e = fields[j + 1] elseif name == 'd' then d = fields[j + 1] end
  end
  flat[n + 1] = entry[1]
  flat[n + 2] = p or false  -- never nil: a nil would end the reply there
  flat[n + 3] = e or false
  flat[n + 4] = d or false
  n = n + 4
end
return flat
