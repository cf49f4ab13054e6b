"""Lua scripts for what a session owns and who holds it: token rotation with reuse detection, atomic feedback,
and the clean-up of handoff entries whose session expired. SessionManager registers and calls them."""

from __future__ import annotations

# Rotates a session's token when it was idle (its last activity in the active set, and the current token's
# issue, before ARGV[4] ms), but only while the presented token (ARGV[1], a digest) is still the live one: of
# two holders of one token, only the first gets a new one. The old digest is kept in the session's
# retired-token hash with the time (ms) after which presenting it again revokes the session's tokens (ARGV[5]).
# KEYS: session, retired tokens, active set. ARGV: presented, new digest, now ms, idle cutoff ms, revoke-after
# ms, TTL s, session id. Returns -1 no session, -2 the presented token is no longer the live one, 0 not idle
# enough, 1 rotated.
ROTATE_TOKEN = """
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
"""

# A token that is not the live one was presented. A retired token presented after its grace (a client's own
# requests still in flight) means two parties hold the session's tokens: every token of the session is revoked
# (the live one becomes retired too, so whoever presents it later is told apart from a stranger).
# KEYS: session, retired tokens. ARGV: presented digest, now ms, TTL s. Returns 0 never this session's token,
# 1 a retired token within its grace, 2 revoked now, 3 already revoked.
TOKEN_REUSE = """
local revoke_after = redis.call('HGET', KEYS[2], ARGV[1])
if not revoke_after then return 0 end
if tonumber(ARGV[2]) <= tonumber(revoke_after) then return 1 end
local current = redis.call('HGET', KEYS[1], 'tokenHash')
if not current or current == 'revoked' then return 3 end
redis.call('HSET', KEYS[2], current, 0)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'tokenHash', 'revoked')
return 2
"""

# Keeps one rating per reply and moves the day's counters in the same step, so concurrent ratings can never
# count a replaced rating twice. The replaced rating is taken back from the day it was counted on.
# KEYS: feedback hash, today's analytics. ARGV: message id, entry JSON, rating, TTL s, analytics key prefix.
RECORD_FEEDBACK = """
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if previous then
  local old = cjson.decode(previous)
  local day_key = KEYS[2]
  if type(old.day) == 'string' then day_key = ARGV[5] .. old.day end
  if tonumber(redis.call('HGET', day_key, 'feedback:' .. old.rating) or '0') > 0 then
    redis.call('HINCRBY', day_key, 'feedback:' .. old.rating, -1)
  end
end
redis.call('HINCRBY', KEYS[2], 'feedback:' .. ARGV[3], 1)
redis.call('EXPIRE', KEYS[2], 3456000)
return 1
"""

# Removes queue and agent-activity entries whose session expired (its record is gone), looking at the
# ARGV[2] oldest of each (the overdue ones are the oldest). KEYS: queue, queue entries, agent activity,
# reply leases. ARGV: session key prefix and suffix (`chat:session:{` and `}`), how many to look at.
# Returns the session ids removed.
DROP_EXPIRED_HANDOFFS = """
local removed = {}
local seen = {}
for _, set_key in ipairs({KEYS[1], KEYS[3]}) do
  for _, session_id in ipairs(redis.call('ZRANGE', set_key, 0, tonumber(ARGV[3]) - 1)) do
    if redis.call('EXISTS', ARGV[1] .. session_id .. ARGV[2]) == 0 then
      redis.call('ZREM', KEYS[1], session_id)
      redis.call('HDEL', KEYS[2], session_id)
      redis.call('ZREM', KEYS[3], session_id)
      redis.call('ZREM', KEYS[4], session_id)
      if not seen[session_id] then
        seen[session_id] = true
        table.insert(removed, session_id)
      end
    end
  end
end
return removed
"""
