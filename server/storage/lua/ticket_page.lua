-- ticket_page.lua: the next ticket ids (with scores), newest first, after a cursor ticket; a cursor ticket no
-- longer listed continues below its score.
--
-- KEYS  name            meaning
--   1   tickets         chat:tickets zset ticket id -> created (ms)
-- ARGV  name            meaning
--   1   after id        the last ticket read, '' to start from the newest
--   2   after score     that ticket's score ('+inf' to start from the newest)
--   3   count           how many ids to return
-- Returns {id, score, id, score, ...}.
local start = 0
if ARGV[1] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
  if rank then start = rank + 1 else start = redis.call('ZCOUNT', KEYS[1], ARGV[2], '+inf') end
end
return redis.call('ZREVRANGE', KEYS[1], start, start + tonumber(ARGV[3]) - 1, 'WITHSCORES')
