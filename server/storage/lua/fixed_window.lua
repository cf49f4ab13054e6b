-- fixed_window.lua: one hit in a fixed-window counter, in one round trip.
--
-- KEYS  name            meaning
--   1   counter         chat:ratelimit:<kind>:<owner>
-- ARGV  name            meaning
--   1   window          the window's length (ms), set when the window opens
-- Returns {count so far in this window, the window's remaining ms}.
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {count, redis.call('PTTL', KEYS[1])}
