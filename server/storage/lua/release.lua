-- release.lua: ends an agent's hold: by that agent (ARGV[2]), or by the idle sweep (ARGV[4] = idle cutoff).
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (state, agentName)
--   2   agent activity  chat:agentactivity zset
-- ARGV  name            meaning
--   1   session id      the session id
--   2   agent           the releasing agent, '' for the sweep
--   3   new state       the state the session returns to (active, ticket, ...)
--   4   idle cutoff     '' for an agent's release; for the sweep: only a hold idle since before this (ms)
-- Returns 1 released, 0 not held (or active again), -1 held by another agent.
if redis.call('HGET', KEYS[1], 'state') ~= 'agent' then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'agentName') ~= ARGV[2] then return -1 end
if ARGV[4] ~= '' then
  local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if score and tonumber(score) > tonumber(ARGV[4]) then return 0 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
redis.call('HDEL', KEYS[1], 'agentName')
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
