-- expire_waiting.lua: takes a session that waited too long out of the queue; only one process wins it.
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (state waiting_agent -> ticket)
--   2   queue           chat:queue zset
--   3   queue entries   chat:queue:entries hash
-- ARGV  name            meaning
--   1   session id      the session id
--   2   wait cutoff     only a session waiting since before this (ms)
-- Returns the queue entry JSON ('' if it had none) to the winner; false (nil) otherwise.
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
local entry = redis.call('HGET', KEYS[3], ARGV[1]) or ''
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[1], 'state') == 'waiting_agent' then redis.call('HSET', KEYS[1], 'state', 'ticket') end
return entry
