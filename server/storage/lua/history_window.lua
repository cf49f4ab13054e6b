-- history_window.lua: reads part of a session's history around a message, in one step with the trim offset
-- (see trim_history.lua): list positions [anchor + ARGV[2], anchor + ARGV[3]], where the anchor is message
-- ARGV[1]'s position, or the list's length when ARGV[1] is ''.
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (reads trimmed)
--   2   history         chat:history:{sid} list
--   3   index           chat:msgindex:{sid} hash message id -> absolute position
-- ARGV  name            meaning
--   1   anchor id       the message to read around, '' for the end of the list
--   2   first           first position, relative to the anchor
--   3   last            last position, relative to the anchor
-- Returns {found (1/0), first list position read, message JSON list}.
local anchor
if ARGV[1] == '' then
  anchor = redis.call('LLEN', KEYS[2])
else
  local pos = redis.call('HGET', KEYS[3], ARGV[1])
  if not pos then return {0, 0, {}} end
  anchor = tonumber(pos) - tonumber(redis.call('HGET', KEYS[1], 'trimmed') or '0')
  if anchor < 0 then return {0, 0, {}} end
end
local first = anchor + tonumber(ARGV[2])
local last = anchor + tonumber(ARGV[3])
if first < 0 then first = 0 end
if last < first then return {1, first, {}} end
return {1, first, redis.call('LRANGE', KEYS[2], first, last)}
