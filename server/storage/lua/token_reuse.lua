-- token_reuse.lua: a token that is not the live one was presented.
--
-- A retired token presented after its grace (a client's own requests still in flight) means two parties hold the
-- session's tokens: every token of the session is revoked (the live one becomes retired too, so whoever presents
-- it later is told apart from a stranger).
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (tokenHash)
--   2   retired tokens  chat:retiredtokens:{sid} hash digest -> revoke-after (ms)
-- ARGV  name            meaning
--   1   presented       the presented token's digest
--   2   now             now (ms)
--   3   ttl             session TTL (s)
-- Returns 0 never this session's token, 1 a retired token within its grace, 2 revoked now, 3 already revoked.
local revoke_after = redis.call('HGET', KEYS[2], ARGV[1])
if not revoke_after then return 0 end
if tonumber(ARGV[2]) <= tonumber(revoke_after) then return 1 end
local current = redis.call('HGET', KEYS[1], 'tokenHash')
if not current or current == 'revoked' then return 3 end
redis.call('HSET', KEYS[2], current, 0)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'tokenHash', 'revoked')
return 2
