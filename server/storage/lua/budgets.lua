-- budgets.lua: token budgets (policy in server/chat/budgets.py), one step for every counter a provider call is
-- charged to.
--
-- When a counter would pass its limit nothing is charged and {index, global used, first} says which (first = 1 the
-- first time today that counter refused, so it is logged once across processes); else all are charged together.
-- A negative ARGV[1] with every limit 0 settles a reservation (adds the difference between the tokens used and
-- those reserved) and refuses nothing.
--
-- KEYS  name            meaning
--   1..n   counters     the day's counters: global first (chat:budget:<day>), then visitor's, client address's
--   n+1..2n noticed     beside each counter its "noticed" marker (<counter>:noticed)
-- ARGV  name            meaning
--   1   amount          tokens to reserve (negative: give back)
--   2   ttl             the counters' TTL (s)
--   3.. limits          each counter's limit (0: counted, no limit; -1: not this call's)
-- Returns {0, global used, 0} charged; {index (1-based), global used, first} refused.
local amount = tonumber(ARGV[1])
local n = #KEYS / 2
local used = {}
for i = 1, n do used[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
for i = 1, n do
  local limit = tonumber(ARGV[2 + i])
  if limit > 0 and used[i] + amount > limit then
    local first = redis.call('SET', KEYS[n + i], '1', 'NX', 'EX', ARGV[2]) and 1 or 0
    return {i, used[1], first}
  end
end
for i = 1, n do
  if tonumber(ARGV[2 + i]) >= 0 and amount ~= 0 then
    local now = redis.call('INCRBY', KEYS[i], amount)
    if now < 0 then redis.call('SET', KEYS[i], 0) end
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
return {0, used[1] + amount, 0}
