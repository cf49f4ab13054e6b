"""Storage: every store over one Redis client, built once by the app, and what only all of them together can do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from server.storage.analytics import AnalyticsStore
from server.storage.messages import MessageStore
from server.storage.queue import QueueStore
from server.storage.rate_limits import RateLimitStore
from server.storage.sessions import SessionStore
from server.storage.tickets import TicketStore


@dataclass(frozen=True, slots=True)
class Storage:
    """The stores, sharing one client (one connection pool); each registers its Lua scripts once."""

    redis: aioredis.Redis
    sessions: SessionStore
    messages: MessageStore
    queue: QueueStore
    tickets: TicketStore
    analytics: AnalyticsStore
    rate_limits: RateLimitStore

    @classmethod
    def open(
        cls,
        redis: aioredis.Redis,
        ttl_seconds: int,
        *,
        max_history: int = 0,
        tickets_per_client_per_hour: int = 0,
        token_reuse_grace: float = 5.0,
    ) -> Storage:
        """Build every store over `redis` (no I/O: scripts load into Redis on first use)."""
        messages = MessageStore(redis, ttl_seconds)
        return cls(
            redis=redis,
            sessions=SessionStore(redis, ttl_seconds, max_history=max_history, token_reuse_grace=token_reuse_grace),
            messages=messages,
            queue=QueueStore(redis),
            tickets=TicketStore(redis, ttl_seconds, tickets_per_client_per_hour=tickets_per_client_per_hour),
            analytics=AnalyticsStore(redis, ttl_seconds, messages),
            rate_limits=RateLimitStore(redis),
        )

    @property
    def ttl_seconds(self) -> int:
        """How long a session lives without activity (SESSION_TIMEOUT)."""
        return self.sessions.ttl_seconds

    async def aclose(self) -> None:
        """Close what the stores hold of their own (the hot path's shared connection), before the client."""
        await self.messages.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers (raises STORAGE_FAILED errors when it does not)."""
        return bool(await self.redis.ping())

    # What a person may ask of everything kept about them -----------------------------------------------------
    async def export(self, session_id: str) -> dict[str, Any]:
        """Everything kept about a session, for the person it belongs to."""
        session = await self.sessions.get(session_id)
        tickets = await self.tickets.of_session(session_id)
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
            "messages": await self.messages.transcript(session_id),
            "escalations": await self.sessions.escalations(session_id),
            "feedback": await self.analytics.feedback_given(session_id),
            "tickets": tickets,
        }

    async def delete(self, session_id: str) -> None:
        """Forget a session: record, history, idempotency keys, queue entry; tickets keep no transcript."""
        await self.tickets.forget_session(session_id)
        await self.sessions.delete(session_id)
