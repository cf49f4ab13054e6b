-- record_escalation.lua: keeps an escalation with its session and counts it in today's analytics, once per ARGV[1]
-- (trigger and time): a buffered escalation written again after a partial failure stores and counts nothing twice.
--
-- KEYS  name            meaning
--   1   escalations     chat:escalations:{sid} list of escalation JSON
--   2   escalation ids  chat:escalationids:{sid} hash of the ids stored
--   3   day analytics   chat:analytics:<day> hash
--   4   day escalated   chat:analytics:<day>:escalated set of session ids
-- ARGV  name            meaning
--   1   escalation id   '<trigger>|<createdAt>'
--   2   escalation      the escalation JSON
--   3   ttl             session TTL (s)
--   4   trigger         the trigger counted
--   5   session id      the session id
-- Returns 1 stored, 0 stored before.
if redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'escalation:' .. ARGV[4], 1)
redis.call('SADD', KEYS[4], ARGV[5])
redis.call('EXPIRE', KEYS[3], 3456000)
redis.call('EXPIRE', KEYS[4], 3456000)
return 1
