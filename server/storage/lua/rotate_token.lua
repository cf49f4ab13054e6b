-- rotate_token.lua: rotates a session's token when it was idle, only while the presented token is the live one.
--
-- Idle: its last activity in the active set, and the current token's issue, before ARGV[4]. Of two holders of one
-- token only the first gets a new one. The old digest is kept in the session's retired-token hash with the time
-- after which presenting it again revokes the session's tokens (ARGV[5]).
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (tokenHash, tokenIssuedAt)
--   2   retired tokens  chat:retiredtokens:{sid} hash digest -> revoke-after (ms)
--   3   active          chat:active zset session id -> last activity (ms)
-- ARGV  name            meaning
--   1   presented       the presented token's digest
--   2   new digest      the new token's digest
--   3   now             now (ms)
--   4   idle cutoff     rotate only when idle since before this (ms)
--   5   revoke after    when presenting the retired token starts revoking (ms)
--   6   ttl             session TTL (s)
--   7   session id      the session id
-- Returns -1 no session, -2 the presented token is no longer the live one, 0 not idle enough, 1 rotated.
local current = redis.call('HGET', KEYS[1], 'tokenHash')
if not current then return -1 end
if current ~= ARGV[1] then return -2 end
local last = redis.call('ZSCORE', KEYS[3], ARGV[7])
if not last then return 0 end
local issued = tonumber(redis.call('HGET', KEYS[1], 'tokenIssuedAt') or '0')
if math.max(tonumber(last), issued) > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], 'tokenHash', ARGV[2], 'tokenIssuedAt', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
