-- budgets.lua: token budgets (policy in server/chat/budgets.py), one step for every counter a provider call is
-- charged to (needs budget_charge.lua). The hot path charges in append.lua and settles in finish_reply.lua; this
-- script serves the rest: a reply written again after its process died, or one whose message waited in the
-- write-behind buffer.
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
local n = #KEYS / 2
local counters, noticed, limits = {}, {}, {}
for i = 1, n do
  counters[i] = KEYS[i]
  noticed[i] = KEYS[n + i]
  limits[i] = tonumber(ARGV[2 + i])
end
local refused, used, first = charge_budgets(counters, noticed, limits, tonumber(ARGV[1]), ARGV[2])
return {refused, used, first}
