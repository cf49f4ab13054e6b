-- auth_failures.lua: one atomic step after a shared secret was compared (server/web/auth_throttle.py), so
-- concurrent guesses cannot slip past the limit: the verdict only counts while the address is admitted, and a
-- right key is refused like a wrong one once the address is locked out.
--
-- KEYS  name            meaning
--   1   lockout         chat:authfail:lock:<address> set while the address is locked out
--   2   failures        chat:authfail:count:<address> this window's failures from the address
--   3   all failures    chat:authfail:count:*all* this window's failures from every address
--   4   refused         chat:authfail:refused:<address> attempts refused during the lockout
-- ARGV  name            meaning
--   1   verdict         1 right, 0 wrong
--   2   window          the failure window (ms)
--   3   allowed         failures allowed from the address per window
--   4   lockout         the lockout's length (ms)
--   5   global allowed  failures allowed from all addresses per window (0: no global limit)
-- Returns {ms to wait (0: admitted), refusals so far, 1 if the global limit refused it, failures, all failures,
--   1 if this failure locked the address out}.
local ttl = redis.call('PTTL', KEYS[1])
local global = 0
if ttl <= 0 then
  ttl = 0
  local limit = tonumber(ARGV[5])
  if limit > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= limit
      and tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then
    ttl = redis.call('PTTL', KEYS[3])
    if ttl <= 0 then ttl = 0 else global = 1 end
  end
end
if ttl > 0 then
  local refused = redis.call('INCR', KEYS[4])
  if refused == 1 then redis.call('PEXPIRE', KEYS[4], ttl) end
  return {ttl, refused, global, 0, 0, 0}
end
if ARGV[1] == '1' then return {0, 0, 0, 0, 0, 0} end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
local g = redis.call('INCR', KEYS[3])
if g == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
local locked = 0
if n >= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[2], KEYS[4])
  locked = 1
end
return {0, 0, 0, n, g, locked}
