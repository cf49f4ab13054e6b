"""SessionManager: the only code that knows Redis keys."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import math
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.lock import Lock

from server.errors import ApiError, unauthorized
from server.storage import privacy_scripts

PREFIX = "chat"

# What an unreachable Redis raises through redis-py (and the socket errors beneath it).
REDIS_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError, ConnectionError, OSError, TimeoutError)
VERIFIED_TOKENS_KEPT = 20_000

# History cap (MAX_HISTORY_PER_SESSION, kept in the session hash as `maxHistory`): the oldest messages are
# trimmed off the list and out of the id and clientMessageId indexes. The index holds absolute positions (the
# n-th message the session ever stored); the session's `trimmed` field counts the messages cut off the front,
# so a list position is the absolute one minus `trimmed`. Sessions stored before the cap have neither field.
_TRIM_LUA = """
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
"""

# Appends one message atomically: refuses unknown sessions, honours clientMessageId idempotence,
# keeps the id->position index, renews every TTL, and returns the context that preceded it.
# A message id already stored (a buffered write retried after its answer was lost) is a duplicate too. With an
# owner (ARGV[9]) and outside an agent's hold, the answer this message now awaits is leased to that owner
# until ARGV[10] (ms): KEYS[7] says which reply it will be, KEYS[8] holds every lease by expiry, so another
# process finishes the reply if its owner dies (see take_expired_leases). A lease found there already belongs
# to a reply nobody finished (its owner died; whoever appends holds the session's turn), and is returned so
# the caller answers that message first.
_APPEND_SCRIPT = (
    _TRIM_LUA
    + """
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
"""
)


# Stores a finished reply with all its book-keeping in one round trip: the message(s) in order (ids already
# stored are skipped, so a retried write stores nothing twice), the streamed text forgotten, the reply's lease
# released, tokens for the budgets, the day's analytics and the provider usage counters.
_FINISH_SCRIPT = (
    _TRIM_LUA
    + """
local ttl = tonumber(ARGV[1])
local n_attempts = tonumber(ARGV[10])
for i = 0, n_attempts - 1 do
  local name = ARGV[11 + 2 * i]
  redis.call('HINCRBY', KEYS[9], name .. ':requests', 1)
  if ARGV[12 + 2 * i] == '1' then redis.call('HINCRBY', KEYS[9], name .. ':failures', 1) end
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
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if tokens > 0 then redis.call('HINCRBY', KEYS[1], 'tokens', tokens) end
local offset = tonumber(redis.call('HGET', KEYS[1], 'trimmed') or '0')
for i = 11 + 2 * n_attempts, #ARGV, 2 do
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
return 1
"""
)

# Fixed-window counter: one round trip; returns the count and the window's remaining milliseconds.
_RATE_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {count, redis.call('PTTL', KEYS[1])}
"""

# Puts a session in the agents' queue unless it is already waiting or held by an agent.
_ENQUEUE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == 'waiting_agent' or state == 'agent' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'waiting_agent', 'waitingSince', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""

# One agent wins a waiting session; everyone else learns its state.
_CLAIM_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'waiting_agent' then return {0, state or ''} end
redis.call('HSET', KEYS[1], 'state', 'agent', 'agentName', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
local entry = redis.call('HGET', KEYS[3], ARGV[1]) or ''
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return {1, entry}
"""

# Ends an agent's hold: by that agent (ARGV[2]), or by the idle sweep (ARGV[4] = idle cutoff).
_RELEASE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'agent' then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'agentName') ~= ARGV[2] then return -1 end
if ARGV[4] ~= '' then
  local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if score and tonumber(score) > tonumber(ARGV[4]) then return 0 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
redis.call('HDEL', KEYS[1], 'agentName')
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Takes a session that waited too long out of the queue; only one process wins it.
_EXPIRE_WAITING_SCRIPT = """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
local entry = redis.call('HGET', KEYS[3], ARGV[1]) or ''
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[1], 'state') == 'waiting_agent' then redis.call('HSET', KEYS[1], 'state', 'ticket') end
return entry
"""


# Keeps an escalation with its session and counts it in today's analytics, once per ARGV[1] (trigger and time):
# a buffered escalation written again after a partial failure stores and counts nothing twice.
_ESCALATION_SCRIPT = """
if redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'escalation:' .. ARGV[4], 1)
redis.call('SADD', KEYS[4], ARGV[5])
redis.call('EXPIRE', KEYS[3], 3456000)
redis.call('EXPIRE', KEYS[4], 3456000)
return 1
"""

# Takes over replies whose owner stopped renewing their lease (it died): each expired lease becomes this
# process's (ARGV[2]) until ARGV[3], with its attempt counted; the dead owner's streamed text is forgotten (so
# no rejoin shows a reply that will never finish) and its last chunk index kept as `resumeIndex`, so the new
# writer goes on under the same message id; the session lock it held (token "<owner>:...") is freed at once.
# Returns {sessionId, pending json, ...}.
_TAKE_LEASES_SCRIPT = """
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
"""

# Token budgets (see server/budgets.py), one step for every counter a provider call is charged to: KEYS are the
# day's counters (global, visitor, client IP) and beside each its "noticed" marker; ARGV[1] is the tokens to
# reserve, ARGV[2] the TTL, ARGV[3..] each counter's limit (0: counted, no limit; -1: not this call's). When a
# counter would pass its limit nothing is charged and {index, global used, first} says which (first = 1 the
# first time today that counter refused, so it is logged once across processes); else all are charged together
# and {0, global used, 0} comes back. A negative ARGV[1] with every limit 0 settles a reservation (adds the
# difference between the tokens used and those reserved) and refuses nothing.
_BUDGET_SCRIPT = """
local amount = tonumber(ARGV[1])
local n = #KEYS / 2
local used = {}
for i = 1, n do used[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
for i = 1, n do
  local limit = tonumber(ARGV[2 + i])
  if limit > 0 and used[i] + amount > limit then
    local first = redis.call('SET', KEYS[n + i], '1', 'NX', 'EX', ARGV[2]) and 1 or 0
    return {i, used[1], first}
  end
end
for i = 1, n do
  if tonumber(ARGV[2 + i]) >= 0 and amount ~= 0 then
    local now = redis.call('INCRBY', KEYS[i], amount)
    if now < 0 then redis.call('SET', KEYS[i], 0) end
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
return {0, used[1] + amount, 0}
"""

# Reads part of a session's history around a message, in one step with the trim offset (see _TRIM_LUA): list
# positions [anchor + ARGV[2], anchor + ARGV[3]], where the anchor is message ARGV[1]'s position, or the
# list's length when ARGV[1] is ''. Returns {found, first position read, items}.
_WINDOW_SCRIPT = """
local anchor
if ARGV[1] == '' then
  anchor = redis.call('LLEN', KEYS[2])
else
  local pos = redis.call('HGET', KEYS[3], ARGV[1])
  if not pos then return {0, 0, {}} end
  anchor = tonumber(pos) - tonumber(redis.call('HGET', KEYS[1], 'trimmed') or '0')
  if anchor < 0 then return {0, 0, {}} end
end
local first = anchor + tonumber(ARGV[2])
local last = anchor + tonumber(ARGV[3])
if first < 0 then first = 0 end
if last < first then return {1, first, {}} end
return {1, first, redis.call('LRANGE', KEYS[2], first, last)}
"""

# One open ticket per session: reserves ticket ARGV[1] for the session unless one is open (or being written,
# reserved less than ARGV[4] ms ago); counts it against the session's client address (at most ARGV[5] an hour,
# 0 = no limit; counter key ARGV[6] .. address). Returns {1, id} reserved, {0, id} one exists, {2, ''} over the
# client's limit, {-1, ''} no such session.
_CLAIM_TICKET_SCRIPT = """
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
"""

# The next ARGV[3] ticket ids (with scores), newest first, after ticket ARGV[1] ('' = from the newest); a cursor
# ticket no longer listed continues below its score ARGV[2].
_TICKET_PAGE_SCRIPT = """
local start = 0
if ARGV[1] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
  if rank then start = rank + 1 else start = redis.call('ZCOUNT', KEYS[1], ARGV[2], '+inf') end
end
return redis.call('ZREVRANGE', KEYS[1], start, start + tonumber(ARGV[3]) - 1, 'WITHSCORES')
"""


def now_iso(ts: float | None = None) -> str:
    """Contract timestamps: ISO 8601 in UTC with milliseconds."""
    moment = datetime.fromtimestamp(ts if ts is not None else time.time(), tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=4)
def _day_name(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86400, tz=UTC).strftime("%Y-%m-%d")


def utc_day() -> str:
    """Today's UTC date as YYYY-MM-DD (counters are kept per day; on the hot path, so cached)."""
    return _day_name(int(time.time() // 86400))


def new_id() -> str:
    """Opaque, unguessable ids (122 random bits)."""
    return str(uuid.uuid4())


def _hash_token(token: str) -> str:
    """Only a digest of each token is stored, so a Redis dump does not hand out sessions."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    """A conversation's record, as the rest of the server sees it."""

    id: str
    user_id: str
    created_at: str
    expires_at: str
    state: str
    metadata: dict[str, Any]
    client_ip: str | None = None  # where the session was opened from: its requests are charged to that address


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What storing a message did: stored it now, or found the earlier one with the same clientMessageId."""

    message: dict[str, Any]
    duplicate: bool
    context: list[dict[str, Any]]
    state: str
    session_tokens: int = 0
    day_tokens: int = 0
    orphan: dict[str, Any] | None = None  # an earlier message's reply that nobody finished (see _APPEND_SCRIPT)


@dataclass(frozen=True, slots=True)
class ReplyLease:
    """Who answers a stored message, and until when without renewing: a dead owner's reply is taken over."""

    owner: str
    reply_id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class TicketPage:
    """One page of tickets, newest first, and the opaque cursor of the next page (None: no more)."""

    tickets: list[dict[str, Any]]
    next_cursor: str | None


def _encode_cursor(ticket_id: str, score: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"id": ticket_id, "s": score})).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[str, str]:
    """(ticket id, score) of the last ticket a page read; ("", "+inf") to start from the newest."""
    if not cursor:
        return "", "+inf"
    try:
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        ticket_id, value = str(data["id"]), float(data["s"])
        if not math.isfinite(value):  # Redis refuses nan as a score (and +-inf would page nothing)
            raise ValueError("not a finite score")
        score = str(value)
    except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        raise ApiError("validation_error", "Invalid cursor.", {"cursor": "Not a cursor this server gave."}) from None
    return ticket_id, score


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of history, oldest first."""

    messages: list[dict[str, Any]]
    has_more: bool


class SessionManager:
    """Sessions, tokens, history, idempotency and usage counters in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        ttl_seconds: int,
        *,
        max_history: int = 0,
        tickets_per_client_per_hour: int = 0,
    ) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self.max_history = max_history  # messages kept per session (0: all); older ones are trimmed
        self.tickets_per_client_per_hour = tickets_per_client_per_hour
        self._snapshots = _SnapshotWriter(redis, ttl_seconds)
        # Sessions whose token this process verified (or issued), so their owners keep chatting while Redis is
        # unreachable: {sessionId: (token digest, session, verified at)}, least recently verified first.
        self._verified: OrderedDict[str, tuple[str, Session, float]] = OrderedDict()
        self._append = redis.register_script(_APPEND_SCRIPT)
        self._finish = redis.register_script(_FINISH_SCRIPT)
        self._enqueue = redis.register_script(_ENQUEUE_SCRIPT)
        self._rate = redis.register_script(_RATE_SCRIPT)
        self._claim = redis.register_script(_CLAIM_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)
        self._expire_waiting = redis.register_script(_EXPIRE_WAITING_SCRIPT)
        self._take_leases = redis.register_script(_TAKE_LEASES_SCRIPT)
        self._escalate = redis.register_script(_ESCALATION_SCRIPT)
        self._window = redis.register_script(_WINDOW_SCRIPT)
        self._claim_ticket = redis.register_script(_CLAIM_TICKET_SCRIPT)
        self._ticket_page = redis.register_script(_TICKET_PAGE_SCRIPT)
        self._budget = redis.register_script(_BUDGET_SCRIPT)
        self._rotate_token = redis.register_script(privacy_scripts.ROTATE_TOKEN)
        self._token_reuse = redis.register_script(privacy_scripts.TOKEN_REUSE)
        self._record_feedback = redis.register_script(privacy_scripts.RECORD_FEEDBACK)
        self._drop_expired_handoffs = redis.register_script(privacy_scripts.DROP_EXPIRED_HANDOFFS)
        # Seconds a rotated token is refused without revoking the session's tokens (TOKEN_REUSE_GRACE).
        self.token_reuse_grace = 5.0

    # Keys -------------------------------------------------------------------------------
    @staticmethod
    def _session_key(session_id: str) -> str:
        return f"{PREFIX}:session:{{{session_id}}}"

    @staticmethod
    def _history_key(session_id: str) -> str:
        return f"{PREFIX}:history:{{{session_id}}}"

    @staticmethod
    def _index_key(session_id: str) -> str:
        return f"{PREFIX}:msgindex:{{{session_id}}}"

    @staticmethod
    def _client_ids_key(session_id: str) -> str:
        return f"{PREFIX}:clientids:{{{session_id}}}"

    @staticmethod
    def _escalations_key(session_id: str) -> str:
        return f"{PREFIX}:escalations:{{{session_id}}}"

    @staticmethod
    def _escalation_ids_key(session_id: str) -> str:
        return f"{PREFIX}:escalationids:{{{session_id}}}"

    @staticmethod
    def _in_flight_key(session_id: str) -> str:
        return f"{PREFIX}:inflight:{{{session_id}}}"

    @staticmethod
    def _pending_key(session_id: str) -> str:
        return f"{PREFIX}:pending:{{{session_id}}}"

    @staticmethod
    def _ticket_key(ticket_id: str) -> str:
        return f"{PREFIX}:ticket:{ticket_id}"

    @staticmethod
    def _session_tickets_key(session_id: str) -> str:
        return f"{PREFIX}:sessiontickets:{{{session_id}}}"

    _QUEUE_KEY = f"{PREFIX}:queue"
    _QUEUE_ENTRIES_KEY = f"{PREFIX}:queue:entries"
    _AGENT_ACTIVITY_KEY = f"{PREFIX}:agentactivity"
    _AGENTS_ONLINE_KEY = f"{PREFIX}:agents:online"
    _TICKETS_KEY = f"{PREFIX}:tickets"
    _ACTIVE_KEY = f"{PREFIX}:active"
    _USAGE_KEY = f"{PREFIX}:usage"
    _LEASES_KEY = f"{PREFIX}:replyleases"

    def _keys(self, session_id: str) -> list[str]:
        return [
            self._session_key(session_id),
            self._history_key(session_id),
            self._index_key(session_id),
            self._client_ids_key(session_id),
            self._escalations_key(session_id),
            self._in_flight_key(session_id),
            self._pending_key(session_id),
            self._escalation_ids_key(session_id),
            self._feedback_key(session_id),
            self._retired_tokens_key(session_id),
        ]

    def _expires_at(self, now: float) -> str:
        return now_iso(now + self.ttl_seconds)

    # Sessions ---------------------------------------------------------------------------
    async def create(self, user_id: str, metadata: dict[str, Any], client_ip: str | None = None) -> tuple[Session, str]:
        """Open a session and hand back its token; the token itself is never stored."""
        now = time.time()
        session = Session(
            id=new_id(),
            user_id=user_id,
            created_at=now_iso(now),
            expires_at=self._expires_at(now),
            state="active",
            metadata=metadata,
            client_ip=client_ip,
        )
        token = secrets.token_urlsafe(32)
        key = self._session_key(session.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "userId": session.user_id,
                    "tokenHash": _hash_token(token),
                    "createdAt": session.created_at,
                    "expiresAt": session.expires_at,
                    "state": session.state,
                    "metadata": json.dumps(metadata, ensure_ascii=False),
                    **({"clientIp": client_ip} if client_ip else {}),
                    **({"maxHistory": self.max_history} if self.max_history > 0 else {}),
                },
            )
            pipe.expire(key, self.ttl_seconds)
            pipe.zadd(self._ACTIVE_KEY, {session.id: now * 1000})
            analytics = self._analytics_key(utc_day())
            pipe.hincrby(analytics, "conversations", 1)
            pipe.expire(analytics, 40 * 86400)
            await pipe.execute()
        self._remember(session, _hash_token(token))
        return session, token

    async def get(self, session_id: str) -> Session | None:
        """The session, or None when it never existed or expired."""
        raw = await self.redis.hgetall(self._session_key(session_id))
        return self._to_session(session_id, raw) if raw else None

    async def authenticate(self, session_id: str, token: str | None) -> Session:
        """The session when the token is its own; one `unauthorized` for every other case.

        While Redis is unreachable, a token this process verified within the session's lifetime still passes;
        any other raises the connection error (the caller answers `unavailable`).
        """
        presented = _hash_token(token or "")
        try:
            raw = await self.redis.hgetall(self._session_key(session_id))
        except REDIS_DOWN:
            known = self._verified.get(session_id)
            if token and known and hmac.compare_digest(known[0], presented) and time.time() - known[2] < self.ttl_seconds:
                return known[1]
            raise
        expected = raw.get(b"tokenHash", b"").decode() if raw else ""
        if not raw or not token or not hmac.compare_digest(expected, presented):
            self._verified.pop(session_id, None)
            if raw and token:
                await self._check_token_reuse(session_id, presented)
            raise unauthorized()
        session = self._to_session(session_id, raw)
        self._remember(session, presented)
        return session

    def _remember(self, session: Session, token_digest: str) -> None:
        """Keep a verified token (bounded, least recently verified dropped first)."""
        self._verified[session.id] = (token_digest, session, time.time())
        self._verified.move_to_end(session.id)
        if len(self._verified) > VERIFIED_TOKENS_KEPT:
            self._verified.popitem(last=False)

    async def touch(self, session_id: str) -> str:
        """Renew every key's TTL on activity; returns the new expiry."""
        now = time.time()
        expires_at = self._expires_at(now)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self._keys(session_id):
                pipe.expire(key, self.ttl_seconds)
            pipe.hset(self._session_key(session_id), "expiresAt", expires_at)
            pipe.zadd(self._ACTIVE_KEY, {session_id: now * 1000})
            await pipe.execute()
        return expires_at

    async def set_state(self, session_id: str, state: str) -> None:
        """Record where the conversation stands (active, escalated, ...)."""
        await self.redis.hset(self._session_key(session_id), "state", state)

    @staticmethod
    def _to_session(session_id: str, raw: dict[bytes, bytes]) -> Session:
        return Session(
            id=session_id,
            user_id=raw[b"userId"].decode(),
            created_at=raw[b"createdAt"].decode(),
            expires_at=raw[b"expiresAt"].decode(),
            state=raw.get(b"state", b"active").decode(),
            metadata=json.loads(raw.get(b"metadata", b"{}")),
            client_ip=raw[b"clientIp"].decode() if b"clientIp" in raw else None,
        )

    # Messages ---------------------------------------------------------------------------
    async def append(
        self,
        session_id: str,
        message: dict[str, Any],
        *,
        client_message_id: str | None = None,
        context_size: int = 0,
        lease: ReplyLease | None = None,
    ) -> AppendResult:
        """Store a message in order; a repeated clientMessageId (or message id) returns the first message instead.

        With a `lease`, the reply this message awaits is leased to its owner in the same step.
        """
        now = time.time()
        keys = [
            *self._keys(session_id)[:4],
            self._ACTIVE_KEY,
            self._day_tokens_key(),
            self._pending_key(session_id),
            self._LEASES_KEY,
        ]
        status, stored, context, state, *rest = await self._append(
            keys=keys,
            args=[
                message["id"],
                orjson.dumps(message),
                client_message_id or "",
                self.ttl_seconds,
                int(now * 1000),
                self._expires_at(now),
                context_size,
                session_id,
                lease.owner if lease else "",
                int(now * 1000 + lease.seconds * 1000) if lease else 0,
                lease.reply_id if lease else "",
            ],
        )
        if status == -1:
            raise ApiError("not_found", "The session has ended.")
        return AppendResult(
            message=orjson.loads(stored),
            duplicate=status == 0,
            context=[orjson.loads(item) for item in context],
            state=state.decode() if isinstance(state, bytes) else str(state),
            session_tokens=int(rest[0]) if rest else 0,
            day_tokens=int(rest[1]) if len(rest) > 1 else 0,
            orphan=orjson.loads(rest[2]) if len(rest) > 2 and rest[2] else None,
        )

    @staticmethod
    def _day_tokens_key(day: str | None = None) -> str:
        return f"{PREFIX}:tokens:{day or utc_day()}"

    async def tokens_today(self) -> int:
        """Provider tokens used today, across processes."""
        return int(await self.redis.get(self._day_tokens_key()) or 0)

    # Token budgets (policy in server/budgets.py) ------------------------------------------------
    @staticmethod
    def budget_key(day: str, scope: str = "", owner: str = "") -> str:
        """A day's budget counter: everyone's (no scope), or one visitor's or client address's."""
        return f"{PREFIX}:budget:{day}" + (f":{scope}:{owner}" if scope else "")

    async def charge_budgets(self, counters: Sequence[tuple[str, int]], tokens: int, ttl_seconds: int) -> tuple[int, int, bool]:
        """Reserve `tokens` on every counter at once unless one would pass its limit (atomic, across processes).

        `counters` are (key, limit) with the global one first; returns (index of the counter that refused, 1-based,
        or 0 when charged; today's global tokens; whether that counter refused for the first time today).
        """
        keys = [key for key, _ in counters]
        refused, used, first = await self._budget(
            keys=[*keys, *(f"{key}:noticed" for key in keys)],
            args=[tokens, ttl_seconds, *(limit for _, limit in counters)],
        )
        return int(refused), int(used), bool(first)

    async def settle_budgets(self, keys: Sequence[str], difference: int, ttl_seconds: int) -> int:
        """Correct reserved tokens by what the provider reported using; returns today's global tokens."""
        _, used, _ = await self._budget(
            keys=[*keys, *(f"{key}:noticed" for key in keys)], args=[difference, ttl_seconds, *(0 for _ in keys)]
        )
        return int(used)

    async def budget_salt(self, day: str, ttl_seconds: int) -> str:
        """The day's random salt for client-address counters (shared by every process, gone after two days)."""
        key = f"{PREFIX}:budget:{day}:salt"
        await self.redis.set(key, secrets.token_hex(16), nx=True, ex=ttl_seconds)
        salt = await self.redis.get(key)
        return salt.decode() if isinstance(salt, bytes) else str(salt)

    async def history(self, session_id: str, limit: int, before: str | None = None) -> HistoryPage:
        """The newest `limit` messages (older than `before`), oldest first."""
        found, start, raw = await self._around(session_id, before, -limit, -1)
        if not found:
            raise ApiError("validation_error", "Unknown message id.", {"before": "No such message in this session."})
        return HistoryPage(messages=[orjson.loads(item) for item in raw], has_more=bool(raw) and start > 0)

    async def _around(self, session_id: str, anchor_id: str | None, first: int, last: int) -> tuple[bool, int, list[bytes]]:
        """History list items [anchor + first, anchor + last] around a message (None: the end), trim-aware."""
        keys = [self._session_key(session_id), self._history_key(session_id), self._index_key(session_id)]
        found, start, raw = await self._window(keys=keys, args=[anchor_id or "", first, last])
        return found == 1, int(start), list(raw)

    async def messages_after(self, session_id: str, message_id: str | None, limit: int = 500) -> list[dict[str, Any]]:
        """What a rejoining client missed: everything after `message_id`, or the latest page."""
        if message_id is None:
            return (await self.history(session_id, limit)).messages
        found, _, raw = await self._around(session_id, message_id, 1, limit)
        if not found:
            return (await self.history(session_id, limit)).messages
        return [orjson.loads(item) for item in raw]

    async def find_reply(self, session_id: str, user_message_id: str) -> dict[str, Any] | None:
        """The answer stored for a user message, for idempotent REST retries."""
        _, _, raw = await self._around(session_id, user_message_id, 1, 20)
        for item in raw:
            message = orjson.loads(item)
            if message.get("replyTo") == user_message_id:
                return message
        return None

    def session_lock(self, session_id: str, timeout: float = 5, wait: float = 120) -> Lock:
        """A Redis lock so one session's messages are handled one at a time across processes.

        Short-lived and renewed by its holder, so a crashed process frees the session within seconds. Its
        holder acquires it with a token that starts with its instance id and a colon: a process that takes
        over the dead holder's reply frees the lock at once (see take_expired_leases).
        """
        return self.redis.lock(f"{PREFIX}:lock:{{{session_id}}}", timeout=timeout, blocking_timeout=wait)

    # Replies being written ---------------------------------------------------------------
    async def save_in_flight(self, session_id: str, message_id: str, text: str, index: int, provider: str) -> None:
        """The text so far of a reply being streamed, so a rejoin on any process can catch up.

        This runs before every chunk event of every stream, so the snapshots of all streams are written
        together (see _SnapshotWriter); it returns once this one is in Redis.
        """
        snapshot = {"messageId": message_id, "text": text, "index": index, "provider": provider}
        await self._snapshots.write(self._in_flight_key(session_id), orjson.dumps(snapshot))

    async def in_flight(self, session_id: str) -> dict[str, Any] | None:
        """`{messageId, text, index, provider}` of the reply being written, if any."""
        try:
            raw = await self.redis.get(self._in_flight_key(session_id))
        except aioredis.ResponseError:  # a snapshot in the older hash form: nothing to resume from
            return None
        if not raw:
            return None
        snapshot = orjson.loads(raw)
        return {
            "messageId": snapshot["messageId"],
            "text": snapshot["text"],
            "index": int(snapshot["index"]),
            "provider": snapshot.get("provider") or None,
        }

    async def message_with_context(
        self, session_id: str, message_id: str, context_size: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """A stored message and the `context_size` messages before it, to answer it again after a crash."""
        found, _, raw = await self._around(session_id, message_id, -context_size, 0)
        if not found or not raw:
            return None
        items = [orjson.loads(item) for item in raw]
        return items[-1], items[:-1]

    # Reply leases -------------------------------------------------------------------------
    async def renew_leases(self, session_ids: Sequence[str], seconds: float) -> None:
        """The owner is alive: push its replies' leases forward (only leases that still exist)."""
        if not session_ids:
            return
        expiry = int(time.time() * 1000 + seconds * 1000)
        await self.redis.zadd(self._LEASES_KEY, dict.fromkeys(session_ids, expiry), xx=True)

    async def take_expired_leases(
        self, owner: str, seconds: float, limit: int = 20, grace: float = 0.0
    ) -> list[tuple[str, dict[str, Any]]]:
        """Replies whose owner died (lease expired more than `grace` ago), now leased to `owner`."""
        now_ms = int(time.time() * 1000)
        raw = await self._take_leases(
            keys=[self._LEASES_KEY],
            args=[
                now_ms - int(grace * 1000),
                owner,
                now_ms + int(seconds * 1000),
                limit,
                f"{PREFIX}:pending:{{",
                "}",
                f"{PREFIX}:inflight:{{",
                f"{PREFIX}:lock:{{",
            ],
        )
        return [(raw[i].decode(), orjson.loads(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def lease(self, session_id: str, message_id: str, lease: ReplyLease) -> None:
        """Lease the reply a stored message awaits (again, after an orphan's reply was finished first)."""
        pending = {"replyTo": message_id, "replyId": lease.reply_id, "owner": lease.owner, "attempt": 1}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._pending_key(session_id), orjson.dumps(pending), ex=self.ttl_seconds)
            pipe.zadd(self._LEASES_KEY, {session_id: int(time.time() * 1000 + lease.seconds * 1000)})
            await pipe.execute()

    async def release_lease(self, session_id: str) -> None:
        """The awaited reply exists after all: nothing is left to finish."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._pending_key(session_id))
            pipe.zrem(self._LEASES_KEY, session_id)
            await pipe.execute()

    async def lease_alive(self, session_id: str) -> bool:
        """Whether the reply being written for this session still has a live owner."""
        expiry = await self.redis.zscore(self._LEASES_KEY, session_id)
        return expiry is not None and expiry > time.time() * 1000

    # Escalations ------------------------------------------------------------------------
    async def record_escalation(self, session_id: str, escalation: dict[str, Any]) -> bool:
        """Keep an escalation with the session and count it for today, once (a replayed write adds nothing)."""
        day_key = self._analytics_key(utc_day())
        stored = await self._escalate(
            keys=[
                self._escalations_key(session_id),
                self._escalation_ids_key(session_id),
                day_key,
                f"{day_key}:escalated",
            ],
            args=[
                f"{escalation['trigger']}|{escalation['createdAt']}",
                orjson.dumps(escalation),
                self.ttl_seconds,
                escalation["trigger"],
                session_id,
            ],
        )
        return stored == 1

    async def escalations(self, session_id: str) -> list[dict[str, Any]]:
        """The session's escalations, oldest first."""
        return [orjson.loads(item) for item in await self.redis.lrange(self._escalations_key(session_id), 0, -1)]

    # Counters ---------------------------------------------------------------------------
    async def provider_usage(self) -> dict[str, int]:
        """`{"openai:requests": n, ...}` across all processes."""
        raw = await self.redis.hgetall(self._USAGE_KEY)
        return {k.decode(): int(v) for k, v in raw.items()}

    async def active_sessions(self) -> int:
        """Sessions with activity within their TTL."""
        cutoff = (time.time() - self.ttl_seconds) * 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self._ACTIVE_KEY, "-inf", cutoff)
            pipe.zcard(self._ACTIVE_KEY)
            _, count = await pipe.execute()
        return int(count)

    # Handoff: queue, claims, agents online ----------------------------------------------
    async def enqueue(self, session_id: str, entry: dict[str, Any]) -> bool | None:
        """Queue a session for agents; False when it already waits or is held, None when it is gone."""
        status = await self._enqueue(
            keys=[self._session_key(session_id), self._QUEUE_KEY, self._QUEUE_ENTRIES_KEY],
            args=[session_id, orjson.dumps(entry), int(time.time() * 1000)],
        )
        return None if status == -1 else status == 1

    async def queue(self) -> list[dict[str, Any]]:
        """Waiting sessions, oldest first."""
        ids = await self.redis.zrange(self._QUEUE_KEY, 0, -1)
        if not ids:
            return []
        raw = await self.redis.hmget(self._QUEUE_ENTRIES_KEY, ids)
        return [orjson.loads(item) for item in raw if item]

    async def update_queue_entry(self, session_id: str, **fields: Any) -> bool:
        """Add late facts (the summary) to a waiting entry."""
        raw = await self.redis.hget(self._QUEUE_ENTRIES_KEY, session_id)
        if raw is None:
            return False
        entry = orjson.loads(raw) | fields
        await self.redis.hset(self._QUEUE_ENTRIES_KEY, session_id, orjson.dumps(entry))
        return True

    async def claim(self, session_id: str, agent_name: str) -> tuple[bool, dict[str, Any] | str]:
        """(True, queue entry) for the one winner; (False, current state) for everyone else."""
        won, value = await self._claim(
            keys=[self._session_key(session_id), self._QUEUE_KEY, self._QUEUE_ENTRIES_KEY, self._AGENT_ACTIVITY_KEY],
            args=[session_id, agent_name, int(time.time() * 1000)],
        )
        if won == 1:
            return True, orjson.loads(value) if value else {}
        return False, value.decode() if isinstance(value, bytes) else str(value)

    async def release(self, session_id: str, agent_name: str | None, new_state: str, idle_cutoff_ms: int | None = None) -> int:
        """1 released, 0 not held (or active again), -1 held by another agent."""
        return int(
            await self._release(
                keys=[self._session_key(session_id), self._AGENT_ACTIVITY_KEY],
                args=[session_id, agent_name or "", new_state, "" if idle_cutoff_ms is None else idle_cutoff_ms],
            )
        )

    async def agent_holder(self, session_id: str) -> str | None:
        """The agent holding the session, if one does."""
        state, name = await self.redis.hmget(self._session_key(session_id), ["state", "agentName"])
        return name.decode() if state == b"agent" and name else None

    async def sessions_held_by(self, agent_name: str) -> list[str]:
        """The conversations an agent holds now (to put a reconnecting agent back in their rooms)."""
        held = [member.decode() for member in await self.redis.zrange(self._AGENT_ACTIVITY_KEY, 0, -1)]
        if not held:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in held:
                pipe.hmget(self._session_key(session_id), ["state", "agentName"])
            holders = await pipe.execute()
        return [
            session_id
            for session_id, (state, name) in zip(held, holders, strict=True)
            if state == b"agent" and name is not None and name.decode() == agent_name
        ]

    async def touch_agent_activity(self, session_id: str) -> None:
        """An agent wrote: the idle clock starts again."""
        await self.redis.zadd(self._AGENT_ACTIVITY_KEY, {session_id: int(time.time() * 1000)}, xx=True)

    async def overdue(self, wait_cutoff_ms: int, idle_cutoff_ms: int) -> tuple[list[str], list[str]]:
        """Sessions waiting since before the wait cutoff, and agent holds idle since before the idle cutoff."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(self._QUEUE_KEY, "-inf", wait_cutoff_ms)
            pipe.zrangebyscore(self._AGENT_ACTIVITY_KEY, "-inf", idle_cutoff_ms)
            waiting, idle = await pipe.execute()
        return [w.decode() for w in waiting], [i.decode() for i in idle]

    async def take_overdue_waiting(self, session_id: str, wait_cutoff_ms: int) -> dict[str, Any] | None:
        """The queue entry, when this process is the one that moves it to a ticket."""
        entry = await self._expire_waiting(
            keys=[self._session_key(session_id), self._QUEUE_KEY, self._QUEUE_ENTRIES_KEY],
            args=[session_id, wait_cutoff_ms],
        )
        if entry is None:
            return None
        return orjson.loads(entry) if entry else {}

    async def agent_seen(self, member: str, *, online: bool) -> None:
        """Keep the shared register of connected agents (each process refreshes its own)."""
        if online:
            await self.redis.zadd(self._AGENTS_ONLINE_KEY, {member: int(time.time() * 1000)})
        else:
            await self.redis.zrem(self._AGENTS_ONLINE_KEY, member)

    async def agents_online(self, fresh_within_ms: int) -> int:
        """Agents connected to any process, seen within the window."""
        cutoff = int(time.time() * 1000) - fresh_within_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self._AGENTS_ONLINE_KEY, "-inf", cutoff)
            pipe.zcard(self._AGENTS_ONLINE_KEY)
            _, count = await pipe.execute()
        return int(count)

    async def set_session_fields(self, session_id: str, **fields: str) -> None:
        """Small facts about the conversation (summary, contact, resolution)."""
        await self.redis.hset(self._session_key(session_id), mapping=fields)

    async def session_fields(self, session_id: str, *names: str) -> dict[str, str | None]:
        """Read back those facts."""
        values = await self.redis.hmget(self._session_key(session_id), list(names))
        return {name: v.decode() if v is not None else None for name, v in zip(names, values, strict=True)}

    async def transcript(self, session_id: str) -> list[dict[str, Any]]:
        """The whole conversation, oldest first."""
        return [orjson.loads(item) for item in await self.redis.lrange(self._history_key(session_id), 0, -1)]

    # Tickets ----------------------------------------------------------------------------
    async def save_ticket(self, ticket: dict[str, Any]) -> None:
        """Create or update a ticket; tickets outlive the session (they are how we follow up)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._ticket_key(ticket["id"]), orjson.dumps(ticket))
            pipe.zadd(self._TICKETS_KEY, {ticket["id"]: int(time.time() * 1000)}, nx=True)
            pipe.sadd(self._session_tickets_key(ticket["sessionId"]), ticket["id"])
            await pipe.execute()

    async def ticket(self, ticket_id: str) -> dict[str, Any] | None:
        """One ticket, or None."""
        raw = await self.redis.get(self._ticket_key(ticket_id))
        return orjson.loads(raw) if raw else None

    async def tickets(self, limit: int = 100, *, status: str | None = None) -> list[dict[str, Any]]:
        """Newest tickets first (of `status` when given: filtered before the limit is applied)."""
        return (await self.ticket_page(limit=limit, status=status)).tickets

    async def ticket_page(
        self, *, limit: int = 100, status: str | None = None, cursor: str | None = None, scan_limit: int = 5000
    ) -> TicketPage:
        """Up to `limit` tickets (of `status`), newest first, after `cursor`; the next page's cursor, if any.

        Tickets are filtered as they are read, so a flood of other tickets never hides matching ones; one page
        reads at most `scan_limit` tickets, and a page cut short there still hands out a cursor to go on.
        """
        after_id, after_score = _decode_cursor(cursor)
        found: list[dict[str, Any]] = []
        scanned = 0
        while True:
            batch = max(limit, 100)
            rows = await self._ticket_page(keys=[self._TICKETS_KEY], args=[after_id, after_score, batch])
            pairs = [(rows[i].decode(), rows[i + 1].decode()) for i in range(0, len(rows), 2)]
            if not pairs:
                return TicketPage(found, None)
            raw = await self.redis.mget([self._ticket_key(ticket_id) for ticket_id, _ in pairs])
            for (ticket_id, score), item in zip(pairs, raw, strict=True):
                after_id, after_score = ticket_id, score
                scanned += 1
                ticket = orjson.loads(item) if item else None
                if ticket is not None and (status is None or ticket.get("status") == status):
                    found.append(ticket)
                if len(found) >= limit or scanned >= scan_limit:
                    return TicketPage(found, _encode_cursor(after_id, after_score))
            if len(pairs) < batch:
                return TicketPage(found, None)

    async def claim_ticket(self, session_id: str, ticket_id: str, pending_ms: int = 60_000) -> tuple[str, str | None]:
        """Reserve the session's one open ticket: ("new", id), ("exists", id), ("limited", None) or ("gone", None).

        Atomic across processes: of concurrent escalations exactly one reserves; the rest see its ticket (or
        its reservation while the ticket is written). Counts against the session's client address.
        """
        status, value = await self._claim_ticket(
            keys=[self._session_key(session_id)],
            args=[
                ticket_id,
                int(time.time() * 1000),
                f"{PREFIX}:ticket:",
                pending_ms,
                self.tickets_per_client_per_hour,
                f"{PREFIX}:ratelimit:tickets:",
            ],
        )
        found = value.decode() if isinstance(value, bytes) else str(value)
        return {1: "new", 0: "exists", 2: "limited"}.get(int(status), "gone"), found or None

    async def contact_changed(self, ticket_id: str, email: str) -> bool:
        """Whether `email` is new for this ticket (atomic: of concurrent identical requests one gets True).

        Only a digest of the address is kept, for the session's lifetime.
        """
        digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()
        previous = await self.redis.set(f"{PREFIX}:ticketcontact:{ticket_id}", digest, ex=self.ttl_seconds, get=True)
        return previous is None or previous.decode() != digest

    async def open_ticket_id(self, session_id: str) -> str | None:
        """The session's open ticket (or one being written), if any."""
        ticket_id = await self.redis.hget(self._session_key(session_id), "ticketId")
        if ticket_id is None:
            return None
        ticket = await self.ticket(ticket_id.decode())
        return ticket_id.decode() if ticket is None or ticket.get("status") == "open" else None

    async def session_ticket_ids(self, session_id: str) -> list[str]:
        """Tickets opened for a session."""
        return sorted(i.decode() for i in await self.redis.smembers(self._session_tickets_key(session_id)))

    # Rate limits --------------------------------------------------------------------------
    async def over_limit(self, bucket: str, limit: int, window_seconds: int = 60) -> float | None:
        """Count one hit in a shared fixed window; seconds to wait when the limit is passed, else None."""
        if limit <= 0:
            return None
        count, ttl_ms = await self._rate(keys=[f"{PREFIX}:ratelimit:{bucket}"], args=[window_seconds * 1000])
        if int(count) <= limit:
            return None
        return max(0.001, int(ttl_ms) / 1000)

    # Privacy ------------------------------------------------------------------------------
    @staticmethod
    def _feedback_key(session_id: str) -> str:
        return f"{PREFIX}:feedback:{{{session_id}}}"

    @staticmethod
    def _retired_tokens_key(session_id: str) -> str:
        return f"{PREFIX}:retiredtokens:{{{session_id}}}"

    def rotate_after(self, idle_seconds: float | None) -> float:
        """TOKEN_ROTATE_AFTER, or half the session's lifetime when unset (a longer idle spell ends the session)."""
        return idle_seconds if idle_seconds is not None else self.ttl_seconds / 2

    async def rotate_token_if_idle(self, session_id: str, token: str, idle_seconds: float | None) -> str | None:
        """A new token when the session was idle that long (the presented one is retired); else None.

        Only the live token rotates: a holder of the same token who comes second is refused (`unauthorized`),
        and presenting the retired token again after TOKEN_REUSE_GRACE revokes every token of the session.
        """
        now_ms = int(time.time() * 1000)
        new_token = secrets.token_urlsafe(32)
        status = await self._rotate_token(
            keys=[self._session_key(session_id), self._retired_tokens_key(session_id), self._ACTIVE_KEY],
            args=[
                _hash_token(token),
                _hash_token(new_token),
                now_ms,
                now_ms - int(self.rotate_after(idle_seconds) * 1000),
                now_ms + int(self.token_reuse_grace * 1000),
                self.ttl_seconds,
                session_id,
            ],
        )
        if status in (-1, -2):
            self._verified.pop(session_id, None)
            raise unauthorized()
        if status != 1:
            return None
        known = self._verified.get(session_id)
        if known is not None:
            self._remember(known[1], _hash_token(new_token))
        logger.info("session {}: token rotated after an idle spell", session_id)
        return new_token

    async def _check_token_reuse(self, session_id: str, presented: str) -> None:
        """A wrong token for an existing session: if it is a retired one, past its grace, revoke the session's tokens."""
        status = await self._token_reuse(
            keys=[self._session_key(session_id), self._retired_tokens_key(session_id)],
            args=[presented, int(time.time() * 1000), self.ttl_seconds],
        )
        if status == 2:
            logger.warning("session {}: a rotated token was presented again; every token of the session revoked", session_id)
        elif status == 3:
            logger.warning("session {}: a token of a revoked session was presented", session_id)

    async def drop_expired_handoffs(self, look_at: int = 200) -> list[str]:
        """Queue and agent-hold entries whose session expired, removed (among the oldest `look_at` of each)."""
        removed = await self._drop_expired_handoffs(
            keys=[self._QUEUE_KEY, self._QUEUE_ENTRIES_KEY, self._AGENT_ACTIVITY_KEY, self._LEASES_KEY],
            args=[f"{PREFIX}:session:{{", "}", look_at],
        )
        return [item.decode() if isinstance(item, bytes) else str(item) for item in removed]

    async def export(self, session_id: str) -> dict[str, Any]:
        """Everything kept about a session, for the person it belongs to."""
        session = await self.get(session_id)
        tickets = [t for t in [await self.ticket(i) for i in await self.session_ticket_ids(session_id)] if t]
        return {
            "session": None
            if session is None
            else {
                "sessionId": session.id,
                "userId": session.user_id,
                "createdAt": session.created_at,
                "expiresAt": session.expires_at,
                "state": session.state,
                "metadata": session.metadata,
                "clientIp": session.client_ip,
            },
            "messages": await self.transcript(session_id),
            "escalations": await self.escalations(session_id),
            "feedback": await self.feedback_given(session_id),
            "tickets": tickets,
        }

    async def feedback_given(self, session_id: str) -> list[dict[str, Any]]:
        """The ratings and comments given in a session, oldest first."""
        entries = [orjson.loads(item) for item in await self.redis.hvals(self._feedback_key(session_id))]
        return sorted(({k: v for k, v in e.items() if k != "day"} for e in entries), key=lambda e: e.get("createdAt", ""))

    async def delete(self, session_id: str) -> None:
        """Forget a session: record, history, idempotency keys, queue entry; tickets keep no transcript."""
        self._verified.pop(session_id, None)
        ticket_ids = await self.session_ticket_ids(session_id)
        for ticket_id in ticket_ids:
            ticket = await self.ticket(ticket_id)
            if ticket is not None:
                ticket.update(transcript=[], summary=None, contact=None, sessionDeleted=True)
                await self.redis.set(self._ticket_key(ticket_id), orjson.dumps(ticket))
            await self.redis.delete(f"{PREFIX}:ticketcontact:{ticket_id}")  # the contact's digest (contact_changed)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                *self._keys(session_id),
                self._session_tickets_key(session_id),
                f"{PREFIX}:ratelimit:messages:{session_id}",  # RateLimits.check_message's counter
                f"{PREFIX}:ratelimit:events:{session_id}",  # RateLimits' client-event counter
                f"{PREFIX}:lock:{{{session_id}}}",
            )
            pipe.zrem(self._ACTIVE_KEY, session_id)
            pipe.zrem(self._QUEUE_KEY, session_id)
            pipe.hdel(self._QUEUE_ENTRIES_KEY, session_id)
            pipe.zrem(self._AGENT_ACTIVITY_KEY, session_id)
            pipe.zrem(self._LEASES_KEY, session_id)
            await pipe.execute()

    # Analytics ----------------------------------------------------------------------------
    @staticmethod
    def _analytics_key(day: str) -> str:
        return f"{PREFIX}:analytics:{day}"

    async def finish_reply(
        self,
        session_id: str,
        messages: list[dict[str, Any]],
        *,
        streamed_id: str | None,
        attempts: Sequence[tuple[str, bool]],
        provider: str | None,
        confidence: float | None,
        latency_ms: float,
        tokens: int,
    ) -> None:
        """Store an answer and everything counted about it in one round trip (the hot path's second write)."""
        now = time.time()
        day = utc_day()
        keys = [
            *self._keys(session_id)[:4],
            self._ACTIVE_KEY,
            self._in_flight_key(session_id),
            self._day_tokens_key(day),
            self._analytics_key(day),
            self._USAGE_KEY,
            self._pending_key(session_id),
            self._LEASES_KEY,
        ]
        args: list[Any] = [
            self.ttl_seconds,
            int(now * 1000),
            self._expires_at(now),
            session_id,
            streamed_id or "",
            max(0, tokens),
            provider or "none",
            "" if confidence is None else repr(float(confidence)),
            latency_bucket(latency_ms),
            len(attempts),
        ]
        for name, failed in attempts:
            args += [name, "1" if failed else "0"]
        for message in messages:
            args += [message["id"], orjson.dumps(message)]
        if await self._finish(keys=keys, args=args) == -1:
            raise ApiError("not_found", "The session has ended.")

    async def count_provider_calls(self, attempts: Sequence[tuple[str, bool]]) -> None:
        """Provider usage of calls made outside a reply (summaries), shared by every process."""
        if not attempts:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, failed in attempts:
                pipe.hincrby(self._USAGE_KEY, f"{name}:requests", 1)
                if failed:
                    pipe.hincrby(self._USAGE_KEY, f"{name}:failures", 1)
            await pipe.execute()

    async def record_feedback(self, session_id: str, message_id: str, rating: str, comment: str | None) -> dict[str, Any]:
        """Keep one rating per reply (a new one replaces it) and count it for the day it was given."""
        _, _, raw = await self._around(session_id, message_id, 0, 0)  # trim-aware position
        message = orjson.loads(raw[0]) if raw else None
        if message is None or message.get("role") != "assistant":
            raise ApiError("not_found", "No such reply in this session.")
        day = utc_day()
        entry = {"messageId": message_id, "rating": rating, "comment": comment, "createdAt": now_iso()}
        await self._record_feedback(
            keys=[self._feedback_key(session_id), self._analytics_key(day)],
            args=[message_id, orjson.dumps(entry | {"day": day}), rating, self.ttl_seconds, self._analytics_key("")],
        )
        return entry

    async def analytics(self, days: int = 30) -> list[dict[str, Any]]:
        """Per-day figures for the last `days` days, newest last."""
        today = datetime.now(tz=UTC).date()
        dates = [(today - timedelta(days=offset)).isoformat() for offset in range(days - 1, -1, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in dates:
                pipe.hgetall(self._analytics_key(day))
                pipe.scard(f"{self._analytics_key(day)}:escalated")
            raw = await pipe.execute()
        return [summarize_day(day, raw[i * 2], int(raw[i * 2 + 1])) for i, day in enumerate(dates)]


LATENCY_BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class _SnapshotWriter:
    """Group commit for streamed-text snapshots: one pipeline of SETs for every snapshot waiting, then the next.

    A command of its own per chunk cost about 100 µs of client CPU each, a third of the server's CPU with 100
    streams; batched, a snapshot costs a few µs. Callers still wait until their snapshot is stored, so a chunk
    never goes out before Redis holds its text.
    """

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl_seconds = ttl_seconds
        self._pending: dict[str, bytes] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (the newest value of a key wins) along with everything else waiting."""
        self._pending[key] = value
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        await waiter

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, value in batch.items():
                        pipe.set(key, value, ex=self._ttl_seconds)
                    await pipe.execute()
            except Exception as err:
                self._fail(waiters, err)
            except BaseException:  # cancelled (shutdown): nobody may be left waiting
                self._fail(waiters + self._waiters, ConnectionError("snapshot writer stopped"))
                raise
            else:
                self._succeed(waiters)

    @staticmethod
    def _succeed(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @staticmethod
    def _fail(waiters: list[asyncio.Future[None]], err: BaseException) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(err)
                waiter.exception()  # a caller cancelled meanwhile must not log "never retrieved"


def latency_bucket(ms: float) -> int:
    """The upper edge of the bucket a latency falls in (cheap percentiles without storing samples)."""
    for edge in LATENCY_BUCKETS_MS:
        if ms <= edge:
            return edge
    return 120000


def summarize_day(day: str, raw: dict[bytes, bytes], escalated_sessions: int) -> dict[str, Any]:
    """One day's stored counters as the analytics answer shows them."""
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    conversations = int(fields.get("conversations", 0))
    providers = {k.split(":", 1)[1]: int(v) for k, v in fields.items() if k.startswith("provider:")}
    replies = sum(providers.values())
    buckets = sorted((int(k.split(":", 1)[1]), int(v)) for k, v in fields.items() if k.startswith("latency:"))

    def percentile(q: float) -> int | None:
        total = sum(n for _, n in buckets)
        if not total:
            return None
        seen = 0
        for edge, n in buckets:
            seen += n
            if seen >= q * total:
                return edge
        return buckets[-1][0]

    up, down = int(fields.get("feedback:up", 0)), int(fields.get("feedback:down", 0))
    confidence_count = int(fields.get("confidenceCount", 0))
    return {
        "date": day,
        "conversations": conversations,
        "containmentRate": None if not conversations else round(max(0.0, 1 - escalated_sessions / conversations), 4),
        "escalations": {k.split(":", 1)[1]: int(v) for k, v in fields.items() if k.startswith("escalation:")},
        "replies": replies,
        "providerShare": {name: round(n / replies, 4) for name, n in providers.items()} if replies else {},
        "meanConfidence": round(float(fields["confidenceSum"]) / confidence_count, 4) if confidence_count else None,
        "tokensUsed": int(fields.get("tokens", 0)),
        "replyLatencyMs": {"p50": percentile(0.5), "p95": percentile(0.95)},
        "feedback": {"up": up, "down": down, "score": round((up - down) / (up + down), 4) if up + down else None},
    }
