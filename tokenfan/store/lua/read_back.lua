-- A run of a session's stream read backwards, flattened for the relay's catch-up history.
-- KEYS: events
-- ARGV: the newest id to read (inclusive), count
-- Reply: {predecessor, ms, seq, epoch, body, ms, seq, epoch, body, ...}: the predecessor of the oldest entry
--   read, then four values per entry, oldest first ({} when nothing was read). No nested list or field names,
--   so the relay parses a page without building a dict (or a list) per entry (redis-py's XREVRANGE reply
--   callback does; it was a third of the relay's work in a storm). An id comes as its two numbers, integers
--   the client reads as such (splitting and converting them in Python was the largest part of the rest);
--   an id with a part too long for a Lua number's exact integers (over 15 digits) comes as its text, then
--   false.
local page = redis.call('XREVRANGE', KEYS[1], ARGV[1], '-', 'COUNT', ARGV[2])
local flat = {}
local n = 1
local find, sub, tonumber = string.find, string.sub, tonumber
for i = #page, 1, -1 do
  local entry = page[i]
  local fields = entry[2]
  local p, e, d
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name == 'p' then p = fields[j + 1] elseif name == 'e' then e = fields[j + 1] elseif name == 'd' then d = fields[j + 1] end
  end
  if i == #page then
    flat[1] = p or false  -- never nil: a nil would end the reply there
  end
  local id = entry[1]
  local dash = find(id, '-', 1, true)
  if dash > 16 or #id - dash > 15 then
    flat[n + 1] = id
    flat[n + 2] = false
  else
    flat[n + 1] = tonumber(sub(id, 1, dash - 1))
    flat[n + 2] = tonumber(sub(id, dash + 1))
  end
  flat[n + 3] = e or false
  flat[n + 4] = d or false
  n = n + 4
end
return flat
