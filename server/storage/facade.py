"""TEMPORARY: the old SessionManager's methods over the new stores, while callers move to the stores.

Each method names the store method it forwards to (the table in the storage report maps them all). Behaviour is
the old one, except that storage's own exceptions (server/storage/errors.py) are raised instead of ApiError. Delete
this module once nothing imports SessionManager.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock

from server.contract import EscalationRecord, Message, QueueEntry, Ticket
from server.storage.keys import RateBucket
from server.storage.messages import AppendResult, HistoryPage, ReplyLease
from server.storage.rate_limits import RateLimitStore
from server.storage.tickets import TicketPage

if TYPE_CHECKING:
    from server.storage.bundle import Storage
    from server.storage.sessions import Session


class SessionManager:
    """The old one-class storage API, forwarding to the stores of one Storage (temporary)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        ttl_seconds: int,
        *,
        max_history: int = 0,
        tickets_per_client_per_hour: int = 0,
        storage: Storage | None = None,
    ) -> None:
        if storage is None:
            from server.storage.bundle import Storage  # here: sessions.py re-exports this class

            storage = Storage.open(
                redis, ttl_seconds, max_history=max_history, tickets_per_client_per_hour=tickets_per_client_per_hour
            )
        self.storage = storage
        self.redis = storage.redis

    @classmethod
    def over(cls, storage: Storage) -> SessionManager:
        """The facade over stores the app already built (so both share one token cache and one snapshot writer)."""
        return cls(storage.redis, storage.ttl_seconds, storage=storage)

    @property
    def ttl_seconds(self) -> int:
        """-> storage.ttl_seconds"""
        return self.storage.ttl_seconds

    @property
    def max_history(self) -> int:
        """-> sessions.max_history"""
        return self.storage.sessions.max_history

    @property
    def tickets_per_client_per_hour(self) -> int:
        """-> tickets.tickets_per_client_per_hour"""
        return self.storage.tickets.tickets_per_client_per_hour

    @property
    def token_reuse_grace(self) -> float:
        """-> sessions.token_reuse_grace"""
        return self.storage.sessions.token_reuse_grace

    @token_reuse_grace.setter
    def token_reuse_grace(self, seconds: float) -> None:
        self.storage.sessions.token_reuse_grace = seconds

    # Sessions -----------------------------------------------------------------------------------------------
    async def create(self, user_id: str, metadata: dict[str, Any], client_ip: str | None = None) -> tuple[Session, str]:
        """-> sessions.create"""
        return await self.storage.sessions.create(user_id, metadata, client_ip)

    async def get(self, session_id: str) -> Session | None:
        """-> sessions.get"""
        return await self.storage.sessions.get(session_id)

    async def authenticate(self, session_id: str, token: str | None) -> Session:
        """-> sessions.authenticate (raises TokenRefused)"""
        return await self.storage.sessions.authenticate(session_id, token)

    async def touch(self, session_id: str) -> str:
        """-> sessions.touch"""
        return await self.storage.sessions.touch(session_id)

    async def set_state(self, session_id: str, state: str) -> None:
        """-> sessions.set_state"""
        await self.storage.sessions.set_state(session_id, state)

    async def set_session_fields(self, session_id: str, **fields: str) -> None:
        """-> sessions.set_fields"""
        await self.storage.sessions.set_fields(session_id, **fields)

    async def session_fields(self, session_id: str, *names: str) -> dict[str, str | None]:
        """-> sessions.fields"""
        return await self.storage.sessions.fields(session_id, *names)

    def rotate_after(self, idle_seconds: float | None) -> float:
        """-> sessions.rotate_after"""
        return self.storage.sessions.rotate_after(idle_seconds)

    async def rotate_token_if_idle(self, session_id: str, token: str, idle_seconds: float | None) -> str | None:
        """-> sessions.rotate_token_if_idle (raises TokenRefused)"""
        return await self.storage.sessions.rotate_token_if_idle(session_id, token, idle_seconds)

    async def record_escalation(self, session_id: str, escalation: Mapping[str, Any]) -> bool:
        """-> sessions.record_escalation"""
        return await self.storage.sessions.record_escalation(session_id, cast(EscalationRecord, escalation))

    async def escalations(self, session_id: str) -> list[dict[str, Any]]:
        """-> sessions.escalations"""
        return cast("list[dict[str, Any]]", await self.storage.sessions.escalations(session_id))

    async def export(self, session_id: str) -> dict[str, Any]:
        """-> Storage.export"""
        return await self.storage.export(session_id)

    async def delete(self, session_id: str) -> None:
        """-> Storage.delete"""
        await self.storage.delete(session_id)

    # Messages -----------------------------------------------------------------------------------------------
    async def append(
        self,
        session_id: str,
        message: Mapping[str, Any],
        *,
        client_message_id: str | None = None,
        context_size: int = 0,
        lease: ReplyLease | None = None,
    ) -> AppendResult:
        """-> messages.append (raises SessionGone)"""
        return await self.storage.messages.append(
            session_id, cast(Message, message), client_message_id=client_message_id, context_size=context_size, lease=lease
        )

    async def finish_reply(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        streamed_id: str | None,
        attempts: Sequence[tuple[str, bool]],
        provider: str | None,
        confidence: float | None,
        latency_ms: float,
        tokens: int,
    ) -> None:
        """-> messages.finish_reply (raises SessionGone)"""
        await self.storage.messages.finish_reply(
            session_id,
            cast("Sequence[Message]", messages),
            streamed_id=streamed_id,
            attempts=attempts,
            provider=provider,
            confidence=confidence,
            latency_ms=latency_ms,
            tokens=tokens,
        )

    async def history(self, session_id: str, limit: int, before: str | None = None) -> HistoryPage:
        """-> messages.history (raises MessageUnknown)"""
        return await self.storage.messages.history(session_id, limit, before)

    async def messages_after(self, session_id: str, message_id: str | None, limit: int = 500) -> list[dict[str, Any]]:
        """-> messages.messages_after"""
        return cast("list[dict[str, Any]]", await self.storage.messages.messages_after(session_id, message_id, limit))

    async def find_reply(self, session_id: str, user_message_id: str) -> dict[str, Any] | None:
        """-> messages.find_reply"""
        return cast("dict[str, Any] | None", await self.storage.messages.find_reply(session_id, user_message_id))

    async def message_with_context(
        self, session_id: str, message_id: str, context_size: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """-> messages.message_with_context"""
        found = await self.storage.messages.message_with_context(session_id, message_id, context_size)
        return cast("tuple[dict[str, Any], list[dict[str, Any]]] | None", found)

    async def transcript(self, session_id: str) -> list[dict[str, Any]]:
        """-> messages.transcript"""
        return cast("list[dict[str, Any]]", await self.storage.messages.transcript(session_id))

    def session_lock(self, session_id: str, timeout: float = 5, wait: float = 120) -> Lock:
        """-> messages.session_lock"""
        return self.storage.messages.session_lock(session_id, timeout, wait)

    async def save_in_flight(self, session_id: str, message_id: str, text: str, index: int, provider: str) -> None:
        """-> messages.save_in_flight"""
        await self.storage.messages.save_in_flight(session_id, message_id, text, index, provider)

    async def in_flight(self, session_id: str) -> dict[str, Any] | None:
        """-> messages.in_flight"""
        return await self.storage.messages.in_flight(session_id)

    async def renew_leases(self, session_ids: Sequence[str], seconds: float) -> None:
        """-> messages.renew_leases"""
        await self.storage.messages.renew_leases(session_ids, seconds)

    async def take_expired_leases(
        self, owner: str, seconds: float, limit: int = 20, grace: float = 0.0
    ) -> list[tuple[str, dict[str, Any]]]:
        """-> messages.take_expired_leases"""
        return await self.storage.messages.take_expired_leases(owner, seconds, limit, grace)

    async def lease(self, session_id: str, message_id: str, lease: ReplyLease) -> None:
        """-> messages.lease"""
        await self.storage.messages.lease(session_id, message_id, lease)

    async def release_lease(self, session_id: str) -> None:
        """-> messages.release_lease"""
        await self.storage.messages.release_lease(session_id)

    async def lease_alive(self, session_id: str) -> bool:
        """-> messages.lease_alive"""
        return await self.storage.messages.lease_alive(session_id)

    # Agents' queue ------------------------------------------------------------------------------------------
    async def enqueue(self, session_id: str, entry: Mapping[str, Any]) -> bool | None:
        """-> queue.enqueue"""
        return await self.storage.queue.enqueue(session_id, cast(QueueEntry, entry))

    async def queue(self) -> list[dict[str, Any]]:
        """-> queue.entries"""
        return cast("list[dict[str, Any]]", await self.storage.queue.entries())

    async def update_queue_entry(self, session_id: str, **fields: Any) -> bool:
        """-> queue.update_entry"""
        return await self.storage.queue.update_entry(session_id, **fields)

    async def claim(self, session_id: str, agent_name: str) -> tuple[bool, dict[str, Any] | str]:
        """-> queue.claim (which answers a Claim instead of this tuple)"""
        claim = await self.storage.queue.claim(session_id, agent_name)
        if claim.won:
            return True, cast("dict[str, Any]", claim.entry or {})
        return False, claim.state

    async def release(self, session_id: str, agent_name: str | None, new_state: str, idle_cutoff_ms: int | None = None) -> int:
        """-> queue.release"""
        return await self.storage.queue.release(session_id, agent_name, new_state, idle_cutoff_ms)

    async def agent_holder(self, session_id: str) -> str | None:
        """-> queue.holder"""
        return await self.storage.queue.holder(session_id)

    async def sessions_held_by(self, agent_name: str) -> list[str]:
        """-> queue.held_by"""
        return await self.storage.queue.held_by(agent_name)

    async def touch_agent_activity(self, session_id: str) -> None:
        """-> queue.touch_agent_activity"""
        await self.storage.queue.touch_agent_activity(session_id)

    async def overdue(self, wait_cutoff_ms: int, idle_cutoff_ms: int) -> tuple[list[str], list[str]]:
        """-> queue.overdue"""
        return await self.storage.queue.overdue(wait_cutoff_ms, idle_cutoff_ms)

    async def take_overdue_waiting(self, session_id: str, wait_cutoff_ms: int) -> dict[str, Any] | None:
        """-> queue.take_overdue_waiting"""
        return await self.storage.queue.take_overdue_waiting(session_id, wait_cutoff_ms)

    async def drop_expired_handoffs(self, look_at: int = 200) -> list[str]:
        """-> queue.drop_expired"""
        return await self.storage.queue.drop_expired(look_at)

    async def agent_seen(self, member: str, *, online: bool) -> None:
        """-> queue.agent_seen"""
        await self.storage.queue.agent_seen(member, online=online)

    async def agents_online(self, fresh_within_ms: int) -> int:
        """-> queue.agents_online"""
        return await self.storage.queue.agents_online(fresh_within_ms)

    # Tickets ------------------------------------------------------------------------------------------------
    async def save_ticket(self, ticket: Mapping[str, Any]) -> None:
        """-> tickets.save"""
        await self.storage.tickets.save(cast(Ticket, ticket))

    async def ticket(self, ticket_id: str) -> dict[str, Any] | None:
        """-> tickets.get"""
        return cast("dict[str, Any] | None", await self.storage.tickets.get(ticket_id))

    async def tickets(self, limit: int = 100, *, status: str | None = None) -> list[dict[str, Any]]:
        """-> tickets.latest"""
        return cast("list[dict[str, Any]]", await self.storage.tickets.latest(limit, status=status))

    async def ticket_page(
        self, *, limit: int = 100, status: str | None = None, cursor: str | None = None, scan_limit: int = 5000
    ) -> TicketPage:
        """-> tickets.page (raises BadCursor)"""
        return await self.storage.tickets.page(limit=limit, status=status, cursor=cursor, scan_limit=scan_limit)

    async def claim_ticket(self, session_id: str, ticket_id: str, pending_ms: int = 60_000) -> tuple[str, str | None]:
        """-> tickets.claim"""
        return await self.storage.tickets.claim(session_id, ticket_id, pending_ms)

    async def contact_changed(self, ticket_id: str, email: str) -> bool:
        """-> tickets.contact_changed"""
        return await self.storage.tickets.contact_changed(ticket_id, email)

    async def open_ticket_id(self, session_id: str) -> str | None:
        """-> tickets.open_ticket_id"""
        return await self.storage.tickets.open_ticket_id(session_id)

    async def session_ticket_ids(self, session_id: str) -> list[str]:
        """-> tickets.session_ticket_ids"""
        return await self.storage.tickets.session_ticket_ids(session_id)

    # Analytics ----------------------------------------------------------------------------------------------
    async def analytics(self, days: int = 30) -> list[dict[str, Any]]:
        """-> analytics.analytics"""
        return await self.storage.analytics.analytics(days)

    async def record_feedback(self, session_id: str, message_id: str, rating: str, comment: str | None) -> dict[str, Any]:
        """-> analytics.record_feedback (raises ReplyUnknown)"""
        return await self.storage.analytics.record_feedback(session_id, message_id, rating, comment)

    async def feedback_given(self, session_id: str) -> list[dict[str, Any]]:
        """-> analytics.feedback_given"""
        return await self.storage.analytics.feedback_given(session_id)

    async def provider_usage(self) -> dict[str, int]:
        """-> analytics.provider_usage"""
        return await self.storage.analytics.provider_usage()

    async def count_provider_calls(self, attempts: Sequence[tuple[str, bool]]) -> None:
        """-> analytics.count_provider_calls"""
        await self.storage.analytics.count_provider_calls(attempts)

    async def active_sessions(self) -> int:
        """-> analytics.active_sessions"""
        return await self.storage.analytics.active_sessions()

    async def tokens_today(self) -> int:
        """-> analytics.tokens_today"""
        return await self.storage.analytics.tokens_today()

    # Limits -------------------------------------------------------------------------------------------------
    async def over_limit(self, bucket: str, limit: int, window_seconds: int = 60) -> float | None:
        """-> rate_limits.over_limit (bucket "<kind>:<owner>" split into RateBucket(kind), owner)"""
        kind, _, owner = bucket.partition(":")
        return await self.storage.rate_limits.over_limit(RateBucket(kind), owner, limit, window_seconds)

    @staticmethod
    def budget_key(day: str, scope: str = "", owner: str = "") -> str:
        """-> rate_limits.budget_key"""
        return RateLimitStore.budget_key(day, scope, owner)

    async def charge_budgets(self, counters: Sequence[tuple[str, int]], tokens: int, ttl_seconds: int) -> tuple[int, int, bool]:
        """-> rate_limits.charge_budgets"""
        return await self.storage.rate_limits.charge_budgets(counters, tokens, ttl_seconds)

    async def settle_budgets(self, keys: Sequence[str], difference: int, ttl_seconds: int) -> int:
        """-> rate_limits.settle_budgets"""
        return await self.storage.rate_limits.settle_budgets(keys, difference, ttl_seconds)

    async def budget_salt(self, day: str, ttl_seconds: int) -> str:
        """-> rate_limits.budget_salt"""
        return await self.storage.rate_limits.budget_salt(day, ttl_seconds)
