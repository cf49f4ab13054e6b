-- claim_ticket.lua: one open ticket per session.
--
-- Reserves ticket ARGV[1] for the session unless one is open (or being written: reserved less than ARGV[4] ms
-- ago), and counts it against the session's client address (at most ARGV[5] an hour, 0 = no limit). A session
-- queued or with an agent keeps its state (the ticket must not undo that); any other becomes `ticket`.
--
-- KEYS  name            meaning
--   1   session         chat:session:{sid} hash (reads ticketId, ticketClaimedAt, clientIp, state)
-- ARGV  name            meaning
--   1   ticket id       the id to reserve
--   2   now             now (ms), kept as ticketClaimedAt
--   3   ticket prefix   'chat:ticket:' (a ticket's key is prefix .. id)
--   4   pending ms      how long a reserved ticket counts as being written
--   5   per hour        tickets allowed per client address an hour (0: no limit)
--   6   counter prefix  'chat:ratelimit:tickets:' (the address's counter is prefix .. address)
-- Returns {1, id} reserved, {0, id} one exists, {2, ''} over the client's limit, {-1, ''} no such session.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local current = redis.call('HGET', KEYS[1], 'ticketId')
if current then
  local raw = redis.call('GET', ARGV[3] .. current)
  if raw then
    if cjson.decode(raw).status == 'open' then return {0, current} end
  elseif tonumber(ARGV[2]) - tonumber(redis.call('HGET', KEYS[1], 'ticketClaimedAt') or '0') < tonumber(ARGV[4]) then
    return {0, current}
  end
end
local limit = tonumber(ARGV[5])
local client = redis.call('HGET', KEYS[1], 'clientIp')
if limit > 0 and client then
  local key = ARGV[6] .. client
  local count = redis.call('INCR', key)
  if count == 1 then redis.call('EXPIRE', key, 3600) end
  if count > limit then return {2, ''} end
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'waiting_agent' or state == 'agent' then  -- queued or with an agent: the ticket must not undo that
  redis.call('HSET', KEYS[1], 'ticketId', ARGV[1], 'ticketClaimedAt', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'state', 'ticket', 'ticketId', ARGV[1], 'ticketClaimedAt', ARGV[2])
end
return {1, ARGV[1]}
