-- session_lock.lua: renews or releases a session's lock, only for the holder that took it (SET NX PX by
-- MessageStore.SessionLock.acquire); the same steps as redis-py's Lock, over the hot path's shared connection.
--
-- KEYS  name            meaning
--   1   lock            chat:lock:{sid} the holder's token
-- ARGV  name            meaning
--   1   token           the holder's token ('<instance id>:<random>')
--   2   ttl             the lock's new time to live (ms); 0 releases it
-- Returns 1 done, 0 the lock is not (or no longer) this holder's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
