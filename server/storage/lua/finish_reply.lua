-- finish_reply.lua: stores a finished reply with all its book-keeping in one round trip: the hot path's only write
-- after the ack (needs trim_history.lua and budget_charge.lua): the message(s) in order (ids already stored are
-- skipped, so a retried write stores nothing twice), the streamed text forgotten, the reply's lease released, tokens
-- for the budgets (the reservation append.lua made, corrected by what the provider reported), the day's analytics
-- and the provider usage counters. The counters are moved even when the session is gone.
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash
--   2   history         chat:history:{sid} list of message JSON
--   3   index           chat:msgindex:{sid} hash message id -> absolute position
--   4   client ids      chat:clientids:{sid} hash (TTL renewed)
--   5   active          chat:active zset session id -> last activity (ms)
--   6   in flight       chat:inflight:{sid} the streamed-text snapshot (JSON string)
--   7   day tokens      chat:tokens:<day>
--   8   day analytics   chat:analytics:<day> hash of the day's counters
--   9   usage           chat:usage hash "<provider>:requests" / "<provider>:failures"
--  10   pending         chat:pending:{sid} the awaited reply's lease record
--  11   reply leases    chat:replyleases zset
--  12.. budgets         the budget counters the reply's reservation was charged to (none: nothing to settle)
-- ARGV  name            meaning
--   1   ttl             session TTL (s)
--   2   now             now (ms): the activity score
--   3   expires at      the session's new expiresAt (ISO 8601)
--   4   session id      the session id
--   5   streamed id     the streamed message's id ('' none): its snapshot is deleted if it is still that one's
--   6   tokens          provider tokens the reply used (>= 0)
--   7   provider        the provider that answered ('none' for none)
--   8   confidence      the reply's confidence, '' for none
--   9   latency bucket  upper edge (ms) of the reply latency's bucket
--  10   settle          tokens used minus tokens reserved, added to every budget counter (0: nothing to settle)
--  11   budget ttl      the budget counters' TTL (s)
--  12   n attempts      how many (name, failed) pairs follow
--  13.. attempts        n pairs: provider name, '1' failed / '0' not
--  then n streaks       how many (field, step, limit) triples follow: counts of something in a row kept in the
--                       session hash (the escalation rules' misses and negative messages)
--  then streaks         n triples: hash field, step ('1' one more, '0' reset, '' untouched), limit (a count that
--                       reaches it is reported and starts over at 0; 0: no limit)
--  then messages        pairs: message id, message JSON, to the end of ARGV
-- Returns {-1, used} when the session is gone (nothing stored, counters moved), else {1, used, count...}; used is
--   today's global budget counter after the settlement, -1 when nothing was settled; one count per streak, after
--   its step (before a reset at its limit).
local ttl = tonumber(ARGV[1])
local n_attempts = tonumber(ARGV[12])
for i = 0, n_attempts - 1 do
  local name = ARGV[13 + 2 * i]
  redis.call('HINCRBY', KEYS[9], name .. ':requests', 1)
  if ARGV[14 + 2 * i] == '1' then redis.call('HINCRBY', KEYS[9], name .. ':failures', 1) end
end
local tokens = tonumber(ARGV[6])
redis.call('HINCRBY', KEYS[8], 'provider:' .. ARGV[7], 1)
if ARGV[8] ~= '' then
  redis.call('HINCRBYFLOAT', KEYS[8], 'confidenceSum', ARGV[8])
  redis.call('HINCRBY', KEYS[8], 'confidenceCount', 1)
end
redis.call('HINCRBY', KEYS[8], 'latency:' .. ARGV[9], 1)
if tokens > 0 then
  redis.call('HINCRBY', KEYS[8], 'tokens', tokens)
  redis.call('INCRBY', KEYS[7], tokens)
  redis.call('EXPIRE', KEYS[7], 3 * 86400)
end
redis.call('EXPIRE', KEYS[8], 40 * 86400)
if ARGV[5] ~= '' and redis.call('TYPE', KEYS[6]).ok == 'string' then
  local streamed = cjson.decode(redis.call('GET', KEYS[6]))
  if streamed.messageId == ARGV[5] then redis.call('DEL', KEYS[6]) end
end
local used = -1
local settle = tonumber(ARGV[10])
if #KEYS > 11 and settle ~= 0 then
  local counters, limits = {}, {}
  for i = 12, #KEYS do
    counters[#counters + 1] = KEYS[i]
    limits[#limits + 1] = 0
  end
  local _
  _, used = charge_budgets(counters, {}, limits, settle, ARGV[11])
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, used} end
if tokens > 0 then redis.call('HINCRBY', KEYS[1], 'tokens', tokens) end
local result = {1, used}
local at = 13 + 2 * n_attempts
local n_streaks = tonumber(ARGV[at] or '0')
for i = 0, n_streaks - 1 do
  local field, step, limit = ARGV[at + 1 + 3 * i], ARGV[at + 2 + 3 * i], tonumber(ARGV[at + 3 + 3 * i])
  local count
  if step == '1' then
    count = redis.call('HINCRBY', KEYS[1], field, 1)
    if limit > 0 and count >= limit then redis.call('HSET', KEYS[1], field, 0) end
  elseif step == '0' then
    count = 0
    redis.call('HSET', KEYS[1], field, 0)
  else
    count = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  end
  result[#result + 1] = count
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'trimmed') or '0')
for i = at + 1 + 3 * n_streaks, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then
    local n = redis.call('RPUSH', KEYS[2], ARGV[i + 1])
    redis.call('HSET', KEYS[3], ARGV[i], offset + n - 1)
  end
end
trim_history(KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('DEL', KEYS[10])
redis.call('ZREM', KEYS[11], ARGV[4])
redis.call('HSET', KEYS[1], 'expiresAt', ARGV[3])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[4])
return result
