-- claim.lua: one agent wins a waiting session; everyone else learns its state.
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (state set to agent, agentName)
--   2   queue           chat:queue zset
--   3   queue entries   chat:queue:entries hash
--   4   agent activity  chat:agentactivity zset session id -> the agent's last activity (ms)
-- ARGV  name            meaning
--   1   session id      the session id
--   2   agent           the claiming agent's name
--   3   now             now (ms)
-- Returns {1, queue entry JSON or ''} won; {0, current state or ''} lost.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'waiting_agent' then return {0, state or ''} end
redis.call('HSET', KEYS[1], 'state', 'agent', 'agentName', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
local entry = redis.call('HGET', KEYS[3], ARGV[1]) or ''
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return {1, entry}
