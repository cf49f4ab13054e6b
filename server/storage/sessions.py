"""Sessions: the record, its tokens (issue, verify, rotate, revoke), its state and small facts, its escalations."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from loguru import logger

from server.contract import EscalationRecord, SessionState, new_id, now_iso
from server.storage import keys, scripts
from server.storage.errors import STORAGE_DOWN, TokenRefused

VERIFIED_TOKENS_KEPT = 20_000
ANALYTICS_TTL_SECONDS = 40 * 86400  # a day's counters are kept 40 days


def hash_token(token: str) -> str:
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
    language: str | None = None  # the visitor's language (ISO 639-1) once a message said it clearly, for agents


class SessionStore:
    """Sessions and their tokens in Redis; a token verified here also passes, from memory, while Redis is down."""

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, *, max_history: int = 0, token_reuse_grace: float = 5.0) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self.max_history = max_history  # messages kept per session (0: all); older ones are trimmed
        # Seconds a rotated token is refused without revoking the session's tokens (TOKEN_REUSE_GRACE).
        self.token_reuse_grace = token_reuse_grace
        # Sessions whose token this process verified (or issued), so their owners keep chatting while Redis is
        # unreachable: {sessionId: (token digest, session, verified at)}, least recently verified first.
        self._verified: OrderedDict[str, tuple[str, Session, float]] = OrderedDict()
        self._rotate_token = scripts.register(redis, "rotate_token")
        self._token_reuse = scripts.register(redis, "token_reuse")
        self._escalate = scripts.register(redis, "record_escalation")

    def expires_at(self, now: float) -> str:
        """A session's expiry when it is active at `now`."""
        return now_iso(now + self.ttl_seconds)

    # The record ---------------------------------------------------------------------------------------------
    async def create(self, user_id: str, metadata: dict[str, Any], client_ip: str | None = None) -> tuple[Session, str]:
        """Open a session (counted in today's conversations) and hand back its token; the token itself is never stored."""
        now = time.time()
        session = Session(
            id=new_id(),
            user_id=user_id,
            created_at=now_iso(now),
            expires_at=self.expires_at(now),
            state=SessionState.ACTIVE.value,
            metadata=metadata,
            client_ip=client_ip,
        )
        token = secrets.token_urlsafe(32)
        key = keys.session(session.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "userId": session.user_id,
                    "tokenHash": hash_token(token),
                    "createdAt": session.created_at,
                    "expiresAt": session.expires_at,
                    "state": session.state,
                    "metadata": json.dumps(metadata, ensure_ascii=False),
                    **({"clientIp": client_ip} if client_ip else {}),
                    **({"maxHistory": self.max_history} if self.max_history > 0 else {}),
                },
            )
            pipe.expire(key, self.ttl_seconds)
            pipe.zadd(keys.ACTIVE, {session.id: now * 1000})
            analytics = keys.analytics(keys.utc_day())
            pipe.hincrby(analytics, "conversations", 1)
            pipe.expire(analytics, ANALYTICS_TTL_SECONDS)
            await pipe.execute()
        self._remember(session, hash_token(token))
        return session, token

    async def get(self, session_id: str) -> Session | None:
        """The session, or None when it never existed or expired."""
        raw = await self.redis.hgetall(keys.session(session_id))
        return _to_session(session_id, cast("dict[bytes, bytes]", raw)) if raw else None

    async def touch(self, session_id: str) -> str:
        """Renew every key's TTL on activity; returns the new expiry."""
        now = time.time()
        expires_at = self.expires_at(now)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys.session_owned(session_id):
                pipe.expire(key, self.ttl_seconds)
            pipe.hset(keys.session(session_id), "expiresAt", expires_at)
            pipe.zadd(keys.ACTIVE, {session_id: now * 1000})
            await pipe.execute()
        return expires_at

    async def set_fields(self, session_id: str, **fields: str) -> None:
        """Small facts about the conversation (summary, contact, resolution)."""
        mapping: dict[Any, Any] = fields  # redis-py's key type is invariant: any text goes
        await self.redis.hset(keys.session(session_id), mapping=mapping)

    async def fields(self, session_id: str, *names: str) -> dict[str, str | None]:
        """Read back those facts."""
        values = await self.redis.hmget(keys.session(session_id), list(names))
        return {name: keys.text(v) if v is not None else None for name, v in zip(names, values, strict=True)}

    async def delete(self, session_id: str) -> None:
        """Forget the session's keys, its place in the queue, holds and leases, its counters and its lock.

        Its tickets are scrubbed first by TicketStore.forget_session (Storage.delete does both, in that order).
        """
        self._verified.pop(session_id, None)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                *keys.session_owned(session_id),
                keys.session_tickets(session_id),
                keys.rate_limit(keys.RateBucket.MESSAGES, session_id),
                keys.rate_limit(keys.RateBucket.EVENTS, session_id),
                keys.lock(session_id),
            )
            pipe.zrem(keys.ACTIVE, session_id)
            pipe.zrem(keys.QUEUE, session_id)
            pipe.hdel(keys.QUEUE_ENTRIES, session_id)
            pipe.zrem(keys.AGENT_ACTIVITY, session_id)
            pipe.zrem(keys.REPLY_LEASES, session_id)
            await pipe.execute()

    # Tokens -------------------------------------------------------------------------------------------------
    async def authenticate(self, session_id: str, token: str | None) -> Session:
        """The session when the token is its own; TokenRefused for every other case (it reveals nothing).

        While Redis is unreachable, a token this process verified within the session's lifetime still passes;
        any other raises the connection error (the caller answers `unavailable`).
        """
        presented = hash_token(token or "")
        try:
            raw = cast("dict[bytes, bytes]", await self.redis.hgetall(keys.session(session_id)))
        except STORAGE_DOWN:
            known = self._verified.get(session_id)
            if token and known and hmac.compare_digest(known[0], presented) and time.time() - known[2] < self.ttl_seconds:
                return known[1]
            raise
        expected = raw.get(b"tokenHash", b"").decode() if raw else ""
        if not raw or not token or not hmac.compare_digest(expected, presented):
            self._verified.pop(session_id, None)
            if raw and token:
                await self._check_token_reuse(session_id, presented)
            raise TokenRefused()
        session = _to_session(session_id, raw)
        self._remember(session, presented)
        return session

    def _remember(self, session: Session, token_digest: str) -> None:
        """Keep a verified token (bounded, least recently verified dropped first)."""
        self._verified[session.id] = (token_digest, session, time.time())
        self._verified.move_to_end(session.id)
        if len(self._verified) > VERIFIED_TOKENS_KEPT:
            self._verified.popitem(last=False)

    def rotate_after(self, idle_seconds: float | None) -> float:
        """TOKEN_ROTATE_AFTER, or half the session's lifetime when unset (a longer idle spell ends the session)."""
        return idle_seconds if idle_seconds is not None else self.ttl_seconds / 2

    async def rotate_token_if_idle(self, session_id: str, token: str, idle_seconds: float | None) -> str | None:
        """A new token when the session was idle that long (the presented one is retired); else None.

        Only the live token rotates: a holder of the same token who comes second is refused (TokenRefused),
        and presenting the retired token again after TOKEN_REUSE_GRACE revokes every token of the session.
        """
        now_ms = int(time.time() * 1000)
        new_token = secrets.token_urlsafe(32)
        status = await self._rotate_token(
            keys=[keys.session(session_id), keys.retired_tokens(session_id), keys.ACTIVE],
            args=[
                hash_token(token),
                hash_token(new_token),
                now_ms,
                now_ms - int(self.rotate_after(idle_seconds) * 1000),
                now_ms + int(self.token_reuse_grace * 1000),
                self.ttl_seconds,
                session_id,
            ],
        )
        if status in (-1, -2):
            self._verified.pop(session_id, None)
            raise TokenRefused()
        if status != 1:
            return None
        known = self._verified.get(session_id)
        if known is not None:
            self._remember(known[1], hash_token(new_token))
        logger.info("session {}: token rotated after an idle spell", session_id)
        return new_token

    async def _check_token_reuse(self, session_id: str, presented: str) -> None:
        """A wrong token for an existing session: if it is a retired one, past its grace, revoke the session's tokens."""
        status = await self._token_reuse(
            keys=[keys.session(session_id), keys.retired_tokens(session_id)],
            args=[presented, int(time.time() * 1000), self.ttl_seconds],
        )
        if status == 2:
            logger.warning("session {}: a rotated token was presented again; every token of the session revoked", session_id)
        elif status == 3:
            logger.warning("session {}: a token of a revoked session was presented", session_id)

    # Escalations --------------------------------------------------------------------------------------------
    async def record_escalation(self, session_id: str, escalation: EscalationRecord) -> bool:
        """Keep an escalation with the session and count it for today, once (a replayed write adds nothing)."""
        day = keys.utc_day()
        stored = await self._escalate(
            keys=[
                keys.escalations(session_id),
                keys.escalation_ids(session_id),
                keys.analytics(day),
                keys.analytics_escalated(day),
            ],
            args=[
                f"{escalation['trigger']}|{escalation['createdAt']}",
                orjson.dumps(escalation),
                self.ttl_seconds,
                escalation["trigger"],
                session_id,
            ],
        )
        return bool(stored == 1)

    async def escalations(self, session_id: str) -> list[EscalationRecord]:
        """The session's escalations, oldest first."""
        return [orjson.loads(item) for item in await self.redis.lrange(keys.escalations(session_id), 0, -1)]


def _to_session(session_id: str, raw: dict[bytes, bytes]) -> Session:
    return Session(
        id=session_id,
        user_id=raw[b"userId"].decode(),
        created_at=raw[b"createdAt"].decode(),
        expires_at=raw[b"expiresAt"].decode(),
        state=raw.get(b"state", b"active").decode(),
        metadata=json.loads(raw.get(b"metadata", b"{}")),
        client_ip=raw[b"clientIp"].decode() if b"clientIp" in raw else None,
        language=raw[b"language"].decode() if raw.get(b"language") else None,
    )
