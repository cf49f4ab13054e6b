-- record_feedback.lua: keeps one rating per reply and moves the day's counters in the same step, so concurrent
-- ratings can never count a replaced rating twice. The replaced rating is taken back from the day it was counted on.
--
-- KEYS  name            meaning
--   1   feedback        chat:feedback:{sid} hash message id -> entry JSON (with its day)
--   2   day analytics   chat:analytics:<today> hash
-- ARGV  name            meaning
--   1   message id      the rated reply
--   2   entry           the entry JSON, with "day"
--   3   rating          up or down
--   4   ttl             session TTL (s)
--   5   analytics pfx   'chat:analytics:' (a day's key is prefix .. day)
-- Returns 1.
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if previous then
  local old = cjson.decode(previous)
  local day_key = KEYS[2]
  if type(old.day) == 'string' then day_key = ARGV[5] .. old.day end
  if tonumber(redis.call('HGET', day_key, 'feedback:' .. old.rating) or '0') > 0 then
    redis.call('HINCRBY', day_key, 'feedback:' .. old.rating, -1)
  end
end
redis.call('HINCRBY', KEYS[2], 'feedback:' .. ARGV[3], 1)
redis.call('EXPIRE', KEYS[2], 3456000)
return 1
