-- append.lua: stores one message in order, atomically: the hot path's only round trip before the ack (needs
-- trim_history.lua and budget_charge.lua).
--
-- First the session's message rate limit (a fixed window, as fixed_window.lua counts it: every attempt counts,
-- refused or not). Then it refuses unknown sessions, honours clientMessageId idempotence (and a message id already
-- stored: a buffered write retried after its answer was lost), keeps the id -> position index, renews every TTL and
-- returns the context that preceded the message. With an owner (ARGV[9]) and outside an agent's hold, the answer
-- this message now awaits is leased to that owner until ARGV[10]: KEYS[7] says which reply it will be, KEYS[8]
-- holds every lease by expiry, so another process finishes the reply if its owner dies (take_expired_leases.lua). A
-- lease found there already belongs to a reply nobody finished (its owner died; whoever appends holds the session's
-- turn) and is returned, so the caller answers that message first.
--
-- With budget counters (KEYS[10..]), the paid provider call that will answer the message is charged to them at
-- once (see budget_charge.lua): its prompt's tokens as fit_prompt counts them for the context returned, plus the
-- reply reserve. Nothing is charged for a message an agent answers or in a session whose own budget is spent.
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
--   9   rate window     chat:ratelimit:messages:<sid> the session's messages this window
--  10.. budgets         n budget counters (global, visitor, client address), then their n "noticed" markers
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
--  12   rate limit      messages per window (0: no limit, KEYS[9] untouched)
--  13   rate window     the window's length (ms)
--  14   language        the message's language (ISO 639-1) when detected confidently, '' to keep the session's
--  15   reserve         tokens reserved for the reply, beside the prompt's
--  16   budget ttl      the budget counters' TTL (s)
--  17   fixed           the tokens of the system prompt and the message
--  18   prompt cap      MAX_PROMPT_TOKENS (0: none)
--  19   truncated       the prompt's tokens if the message has to be cut to fit the cap
--  20   session budget  the session's own token budget (0: none)
--  21.. limits         each budget counter's limit (0: counted, no limit; -1: not this call's)
-- Returns {-2, ms left in the window} over the rate limit (nothing else done); {-1, false, {}, ''} no such session;
--   {0, stored message JSON, {}, state} a duplicate (the first one); {1, false (the message is ARGV[2]), context
--   JSON list, state, session tokens, day tokens, orphaned pending JSON or false, budget, language} stored, where
--   budget is false when nothing was charged, else {refused index or 0, global used, first, tokens reserved}, and
--   language is the session's language after this message ('' none yet).
local rate_limit = tonumber(ARGV[12] or '0')
if rate_limit > 0 then
  local count = redis.call('INCR', KEYS[9])
  if count == 1 then redis.call('PEXPIRE', KEYS[9], ARGV[13]) end
  if count > rate_limit then return {-2, redis.call('PTTL', KEYS[9])} end
end
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
if (ARGV[14] or '') ~= '' then redis.call('HSET', KEYS[1], 'language', ARGV[14]) end
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
local budget = false
local n_budgets = (#KEYS - 9) / 2
local session_budget = tonumber(ARGV[20] or '0')
if n_budgets > 0 and state ~= 'agent' and not (session_budget > 0 and tokens >= session_budget) then
  local counters, noticed, limits = {}, {}, {}
  for i = 1, n_budgets do
    counters[i] = KEYS[9 + i]
    noticed[i] = KEYS[9 + n_budgets + i]
    limits[i] = tonumber(ARGV[20 + i])
  end
  local reserve = prompt_tokens(context, tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])) + tonumber(ARGV[15])
  local refused, used, first = charge_budgets(counters, noticed, limits, reserve, ARGV[16])
  budget = {refused, used, first, reserve}
end
return {1, false, context, state, tokens, day_tokens, orphan, budget,
  redis.call('HGET', KEYS[1], 'language') or ''}
