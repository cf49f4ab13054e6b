-- trim_history.lua: a function, not a script. It is prepended to append.lua and finish_reply.lua when they load.
--
-- trim_history(session_key, history_key, index_key, client_key) enforces the history cap (MAX_HISTORY_PER_SESSION,
-- kept in the session hash as `maxHistory`; 0 or absent: no cap): the oldest messages are trimmed off the list and
-- out of the id and clientMessageId indexes. The index holds absolute positions (the n-th message the session ever
-- stored); the session's `trimmed` field counts the messages cut off the front, so a list position is the absolute
-- one minus `trimmed`. Sessions stored before the cap have neither field.
--
-- arg            meaning
-- session_key    the session hash (reads maxHistory, adds to trimmed)
-- history_key    the history list of message JSON
-- index_key      hash message id -> absolute position
-- client_key     hash clientMessageId -> message id
-- Returns nothing.
local function trim_history(session_key, history_key, index_key, client_key)
  local keep = tonumber(redis.call('HGET', session_key, 'maxHistory') or '0')
  if keep <= 0 then return end
  local n = redis.call('LLEN', history_key)
  if n <= keep then return end
  local drop = n - keep
  for _, raw in ipairs(redis.call('LRANGE', history_key, 0, drop - 1)) do
    local ok, old = pcall(cjson.decode, raw)
    if ok and type(old) == 'table' then
      if type(old.id) == 'string' then redis.call('HDEL', index_key, old.id) end
      if type(old.clientMessageId) == 'string' then redis.call('HDEL', client_key, old.clientMessageId) end
    end
  end
  redis.call('LTRIM', history_key, drop, -1)
  redis.call('HINCRBY', session_key, 'trimmed', drop)
end
