"""Every Redis key the server uses, named in one place (docs/architecture.md shows the schema).

Keys of one session carry its id as a hash tag (`{sid}`), so a cluster keeps them on one slot and the Lua scripts
that touch several of them stay legal. Nothing outside this module spells a key; Lua scripts receive theirs as KEYS,
or, for keys they derive per session (take_expired_leases.lua, drop_expired_handoffs.lua), as the prefix and
suffix below.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from enum import StrEnum

PREFIX = "chat"
TAG_END = "}"  # closes the hash tag of every per-session key

# Per-session keys: prefix + session id + TAG_END.
SESSION_PREFIX = f"{PREFIX}:session:{{"
HISTORY_PREFIX = f"{PREFIX}:history:{{"
INDEX_PREFIX = f"{PREFIX}:msgindex:{{"
CLIENT_IDS_PREFIX = f"{PREFIX}:clientids:{{"
ESCALATIONS_PREFIX = f"{PREFIX}:escalations:{{"
ESCALATION_IDS_PREFIX = f"{PREFIX}:escalationids:{{"
IN_FLIGHT_PREFIX = f"{PREFIX}:inflight:{{"
PENDING_PREFIX = f"{PREFIX}:pending:{{"
FEEDBACK_PREFIX = f"{PREFIX}:feedback:{{"
RETIRED_TOKENS_PREFIX = f"{PREFIX}:retiredtokens:{{"
SESSION_TICKETS_PREFIX = f"{PREFIX}:sessiontickets:{{"
LOCK_PREFIX = f"{PREFIX}:lock:{{"

# Shared keys.
ACTIVE = f"{PREFIX}:active"  # zset: session id -> last activity (ms)
QUEUE = f"{PREFIX}:queue"  # zset: session id -> waiting since (ms)
QUEUE_ENTRIES = f"{PREFIX}:queue:entries"  # hash: session id -> queue entry JSON
AGENT_ACTIVITY = f"{PREFIX}:agentactivity"  # zset: held session id -> the agent's last activity (ms)
AGENTS_ONLINE = f"{PREFIX}:agents:online"  # zset: "<instance>:<sid>" -> last seen (ms)
TICKETS = f"{PREFIX}:tickets"  # zset: ticket id -> created (ms)
USAGE = f"{PREFIX}:usage"  # hash: "<provider>:requests" / "<provider>:failures"
REPLY_LEASES = f"{PREFIX}:replyleases"  # zset: session id -> lease expiry (ms)

TICKET_PREFIX = f"{PREFIX}:ticket:"
TICKET_CONTACT_PREFIX = f"{PREFIX}:ticketcontact:"
ANALYTICS_PREFIX = f"{PREFIX}:analytics:"
DAY_TOKENS_PREFIX = f"{PREFIX}:tokens:"
BUDGET_PREFIX = f"{PREFIX}:budget:"
RATE_LIMIT_PREFIX = f"{PREFIX}:ratelimit:"
AUTH_FAILURES_PREFIX = f"{PREFIX}:authfail:"


class RateBucket(StrEnum):
    """What a fixed-window counter counts (the middle part of its key)."""

    SESSIONS = "sessions"  # sessions opened per client address
    MESSAGES = "messages"  # messages per session
    EVENTS = "events"  # other client events per session
    CONNECTIONS = "connections"  # sockets opened per client address
    TICKETS = "tickets"  # tickets per client address an hour (claim_ticket.lua)


# Per session ---------------------------------------------------------------------------------------------------
def session(session_id: str) -> str:
    """The session's hash: owner, token digest, state, expiry, metadata, small facts."""
    return f"{SESSION_PREFIX}{session_id}{TAG_END}"


def history(session_id: str) -> str:
    """The session's messages, oldest first (a list of JSON)."""
    return f"{HISTORY_PREFIX}{session_id}{TAG_END}"


def message_index(session_id: str) -> str:
    """Message id -> absolute position in the history."""
    return f"{INDEX_PREFIX}{session_id}{TAG_END}"


def client_ids(session_id: str) -> str:
    """clientMessageId -> message id, for idempotent sends."""
    return f"{CLIENT_IDS_PREFIX}{session_id}{TAG_END}"


def escalations(session_id: str) -> str:
    """The session's escalations, oldest first (a list of JSON)."""
    return f"{ESCALATIONS_PREFIX}{session_id}{TAG_END}"


def escalation_ids(session_id: str) -> str:
    """The escalations already stored, so a replayed write adds nothing."""
    return f"{ESCALATION_IDS_PREFIX}{session_id}{TAG_END}"


def in_flight(session_id: str) -> str:
    """The text so far of the reply being streamed (a JSON snapshot)."""
    return f"{IN_FLIGHT_PREFIX}{session_id}{TAG_END}"


def pending(session_id: str) -> str:
    """The reply this session awaits and who writes it (the lease's record)."""
    return f"{PENDING_PREFIX}{session_id}{TAG_END}"


def feedback(session_id: str) -> str:
    """Ratings given in the session: reply id -> entry JSON."""
    return f"{FEEDBACK_PREFIX}{session_id}{TAG_END}"


def retired_tokens(session_id: str) -> str:
    """Digests of the session's rotated tokens -> when presenting one revokes the session's tokens (ms)."""
    return f"{RETIRED_TOKENS_PREFIX}{session_id}{TAG_END}"


def session_tickets(session_id: str) -> str:
    """The ids of the tickets opened for the session (a set)."""
    return f"{SESSION_TICKETS_PREFIX}{session_id}{TAG_END}"


def lock(session_id: str) -> str:
    """The lock that keeps one session's messages one at a time across processes."""
    return f"{LOCK_PREFIX}{session_id}{TAG_END}"


def conversation(session_id: str) -> list[str]:
    """The four keys every message write touches: session, history, index, client ids (KEYS[1..4] of the scripts)."""
    return [session(session_id), history(session_id), message_index(session_id), client_ids(session_id)]


def session_owned(session_id: str) -> list[str]:
    """Every key that lives and expires with the session (renewed on activity, deleted with it)."""
    return [
        *conversation(session_id),
        escalations(session_id),
        in_flight(session_id),
        pending(session_id),
        escalation_ids(session_id),
        feedback(session_id),
        retired_tokens(session_id),
    ]


# Tickets -------------------------------------------------------------------------------------------------------
def ticket(ticket_id: str) -> str:
    """One ticket's JSON (tickets outlive their session)."""
    return f"{TICKET_PREFIX}{ticket_id}"


def ticket_contact(ticket_id: str) -> str:
    """A digest of the contact address last given for a ticket."""
    return f"{TICKET_CONTACT_PREFIX}{ticket_id}"


# Per day -------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _day_name(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86400, tz=UTC).strftime("%Y-%m-%d")


def utc_day() -> str:
    """Today's UTC date as YYYY-MM-DD, as per-day keys name it (on the hot path, so cached)."""
    return _day_name(int(time.time() // 86400))


def analytics(day: str) -> str:
    """A day's analytics counters (a hash)."""
    return f"{ANALYTICS_PREFIX}{day}"


def analytics_escalated(day: str) -> str:
    """The sessions escalated on a day (a set)."""
    return f"{ANALYTICS_PREFIX}{day}:escalated"


def day_tokens(day: str) -> str:
    """Provider tokens used on a day, as the replies stored report them."""
    return f"{DAY_TOKENS_PREFIX}{day}"


def budget(day: str, scope: str = "", owner: str = "") -> str:
    """A day's budget counter: everyone's (no scope), or one visitor's or client address's."""
    return f"{BUDGET_PREFIX}{day}" + (f":{scope}:{owner}" if scope else "")


def budget_noticed(counter: str) -> str:
    """Set the first time a budget counter refused today (so that is logged once across processes)."""
    return f"{counter}:noticed"


def budget_salt(day: str) -> str:
    """The day's random salt for client-address budget counters."""
    return f"{BUDGET_PREFIX}{day}:salt"


# Abuse limits --------------------------------------------------------------------------------------------------
def rate_limit(bucket: RateBucket, owner: str) -> str:
    """A fixed-window counter of one client address or session."""
    return f"{RATE_LIMIT_PREFIX}{bucket.value}:{owner}"


TICKETS_PER_CLIENT_PREFIX = f"{RATE_LIMIT_PREFIX}{RateBucket.TICKETS.value}:"  # + client address (claim_ticket.lua)


def auth_failures(bucket: str) -> list[str]:
    """KEYS of auth_failures.lua for one client address bucket: lockout, failures, everyone's failures, refusals."""
    return [
        f"{AUTH_FAILURES_PREFIX}lock:{bucket}",
        f"{AUTH_FAILURES_PREFIX}count:{bucket}",
        f"{AUTH_FAILURES_PREFIX}count:*all*",
        f"{AUTH_FAILURES_PREFIX}refused:{bucket}",
    ]


def text(raw: bytes | str) -> str:
    """A value Redis returned as text (the client keeps bytes; redis-py's types allow either)."""
    return raw.decode() if isinstance(raw, bytes) else raw
