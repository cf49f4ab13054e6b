-- append.lua: stores one message in order, atomically (the hot path's first write; needs trim_history.lua).
--
-- Refuses unknown sessions, honours clientMessageId idempotence (and a message id already stored: a buffered write
-- retried after its answer was lost), keeps the id -> position index, renews every TTL and returns the context
-- that preceded the message. With an owner (ARGV[9]) and outside an agent's hold, the answer this message now
-- awaits is leased to that owner until ARGV[10]: KEYS[7] says which reply it will be, KEYS[8] holds every lease by
-- expiry, so another process finishes the reply if its owner dies (take_expired_leases.lua). A lease found there
-- already belongs to a reply nobody finished (its owner died; whoever appends holds the session's turn) and is
-- returned, so the caller answers that message first.
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash
--   2   history         chat:history:{sid} list of message JSON
--   3   index           chat:msgindex:{sid} hash message id -> absolute position
--   4   client ids      chat:clientids:{sid} hash clientMessageId -> message id
--   5   active          chat:active zset session id -> last activity (ms)
--   6   day tokens      chat:tokens:<day> provider tokens used today
--   7   pending         chat:pending:{sid} the reply this session awaits (JSON), if leased
--   8   reply leases    chat:replyleases zset session id -> lease expiry (ms)
-- ARGV  name            meaning
--   1   message id      the message's id
--   2   message         the message JSON
--   3   client id       its clientMessageId, '' for none
--   4   ttl             session TTL (s)
--   5   now             now (ms): the activity score
--   6   expires at      the session's new expiresAt (ISO 8601)
--   7   context size    how many earlier messages to return
--   8   session id      the session id (member of the active and lease sets)
--   9   owner           the lease owner (instance id), '' for no lease
--  10   lease expiry    when the lease runs out (ms), 0 without an owner
--  11   reply id        the id the awaited reply will be stored under, '' without an owner
-- Returns {-1, false, {}, ''} no such session; {0, stored message JSON, {}, state} a duplicate (the first one);
--   {1, message JSON, context JSON list, state, session tokens, day tokens, orphaned pending JSON or false} stored.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, false, {}, ''} end
local offset = tonumber(redis.call('HGET', KEYS[1], 'trimmed') or '0')
local known = redis.call('HGET', KEYS[3], ARGV[1])
if known then return {0, redis.call('LINDEX', KEYS[2], tonumber(known) - offset), {}, state} end
if ARGV[3] ~= '' then
  local existing = redis.call('HGET', KEYS[4], ARGV[3])
  local pos = existing and redis.call('HGET', KEYS[3], existing)
  if pos then return {0, redis.call('LINDEX', KEYS[2], tonumber(pos) - offset), {}, state} end
end
local n = redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], offset + n - 1)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[4], ARGV[3], ARGV[1]) end
redis.call('HSET', KEYS[1], 'expiresAt', ARGV[6])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[8])
local orphan = false
if ARGV[9] ~= '' and state ~= 'agent' then
  orphan = redis.call('GET', KEYS[7])
  redis.call('SET', KEYS[7], cjson.encode({replyTo = ARGV[1], replyId = ARGV[11], owner = ARGV[9], attempt = 1}),
    'EX', ARGV[4])
  redis.call('ZADD', KEYS[8], ARGV[10], ARGV[8])
end
local context = {}
local want = tonumber(ARGV[7])
if want > 0 and n > 1 then
  local first = n - 1 - want
  if first < 0 then first = 0 end
  context = redis.call('LRANGE', KEYS[2], first, n - 2)
end
trim_history(KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local day_tokens = tonumber(redis.call('GET', KEYS[6]) or '0')
return {1, ARGV[2], context, state, tokens, day_tokens, orphan}
