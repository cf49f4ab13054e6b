-- take_expired_leases.lua: takes over replies whose owner stopped renewing their lease (it died).
--
-- Each expired lease becomes this process's (ARGV[2]) until ARGV[3], with its attempt counted; the dead owner's
-- streamed text is forgotten (so no rejoin shows a reply that will never finish) and its last chunk index kept as
-- `resumeIndex`, so the new writer goes on under the same message id; the session lock it held (a token
-- "<owner>:...") is freed at once. A lease with no pending record left is dropped.
--
-- KEYS  name            meaning
--   1   reply leases    chat:replyleases zset session id -> lease expiry (ms)
-- ARGV  name            meaning
--   1   due before      leases expired at or before this (ms) are taken
--   2   owner           the new owner (this process's instance id)
--   3   lease expiry    the taken leases' new expiry (ms)
--   4   limit           at most this many leases
--   5   pending prefix  'chat:pending:{' (the pending key is prefix .. sid .. suffix)
--   6   suffix          '}' closing every per-session key's hash tag
--   7   in-flight pfx   'chat:inflight:{'
--   8   lock prefix     'chat:lock:{'
-- Returns {session id, pending JSON, session id, pending JSON, ...} of the replies taken.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local taken = {}
for _, session_id in ipairs(due) do
  local pending_key = ARGV[5] .. session_id .. ARGV[6]
  local raw = redis.call('GET', pending_key)
  if raw then
    local pending = cjson.decode(raw)
    local lock_key = ARGV[8] .. session_id .. ARGV[6]
    local holder = redis.call('GET', lock_key)
    if holder and pending.owner and string.sub(holder, 1, #pending.owner + 1) == pending.owner .. ':' then
      redis.call('DEL', lock_key)
    end
    pending.owner = ARGV[2]
    pending.attempt = (tonumber(pending.attempt) or 1) + 1
    local snapshot_key = ARGV[7] .. session_id .. ARGV[6]
    local snapshot = redis.call('GET', snapshot_key)
    if snapshot then
      local streamed = cjson.decode(snapshot)
      if streamed.messageId == pending.replyId then pending.resumeIndex = tonumber(streamed.index) end
      redis.call('DEL', snapshot_key)
    end
    local encoded = cjson.encode(pending)
    redis.call('SET', pending_key, encoded, 'KEEPTTL')
    redis.call('ZADD', KEYS[1], ARGV[3], session_id)
    table.insert(taken, session_id)
    table.insert(taken, encoded)
  else
    redis.call('ZREM', KEYS[1], session_id)
  end
end
return taken
