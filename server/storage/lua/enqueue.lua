-- enqueue.lua: puts a session in the agents' queue unless it is already waiting or held by an agent.
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (state set to waiting_agent, waitingSince)
--   2   queue           chat:queue zset session id -> waiting since (ms)
--   3   queue entries   chat:queue:entries hash session id -> queue entry JSON
-- ARGV  name            meaning
--   1   session id      the session id
--   2   entry           the queue entry JSON
--   3   now             now (ms)
-- Returns -1 no such session, 0 already waiting or held, 1 queued.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == 'waiting_agent' or state == 'agent' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'waiting_agent', 'waitingSince', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
