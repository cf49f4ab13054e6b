-- drop_expired_handoffs.lua: removes queue and agent-activity entries whose session expired (its record is gone),
-- looking at the ARGV[3] oldest of each (the overdue ones are the oldest).
--
-- KEYS  name            meaning
--   1   queue           chat:queue zset
--   2   queue entries   chat:queue:entries hash
--   3   agent activity  chat:agentactivity zset
--   4   reply leases    chat:replyleases zset
-- ARGV  name            meaning
--   1   session prefix  'chat:session:{' (a session's key is prefix .. sid .. suffix)
--   2   suffix          '}'
--   3   look at         how many of the oldest entries of each set to look at
-- Returns the session ids removed.
local removed = {}
local seen = {}
for _, set_key in ipairs({KEYS[1], KEYS[3]}) do
  for _, session_id in ipairs(redis.call('ZRANGE', set_key, 0, tonumber(ARGV[3]) - 1)) do
    if redis.call('EXISTS', ARGV[1] .. session_id .. ARGV[2]) == 0 then
      redis.call('ZREM', KEYS[1], session_id)
      redis.call('HDEL', KEYS[2], session_id)
      redis.call('ZREM', KEYS[3], session_id)
      redis.call('ZREM', KEYS[4], session_id)
      if not seen[session_id] then
        seen[session_id] = true
        table.insert(removed, session_id)
      end
    end
  end
end
return removed
