"""Tickets: conversations kept for a follow-up, one open per session, paged newest first; they outlive the session."""

from __future__ import annotations

import base64
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
import redis.asyncio as aioredis

from server.contract import Ticket
from server.storage import keys, scripts
from server.storage.errors import BadCursor

ClaimOutcome = Literal["new", "exists", "limited", "gone"]


@dataclass(frozen=True, slots=True)
class TicketPage:
    """One page of tickets, newest first, and the opaque cursor of the next page (None: no more)."""

    tickets: list[Ticket]
    next_cursor: str | None


class TicketStore:
    """Tickets by id, a session's tickets, the newest-first index, and the one-open-ticket-per-session claim."""

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, *, tickets_per_client_per_hour: int = 0) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self.tickets_per_client_per_hour = tickets_per_client_per_hour
        self._claim = scripts.register(redis, "claim_ticket")
        self._page = scripts.register(redis, "ticket_page")

    async def save(self, ticket: Ticket) -> None:
        """Create or update a ticket; tickets outlive the session (they are how we follow up)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.ticket(ticket["id"]), orjson.dumps(ticket))
            pipe.zadd(keys.TICKETS, {ticket["id"]: int(time.time() * 1000)}, nx=True)
            pipe.sadd(keys.session_tickets(ticket["sessionId"]), ticket["id"])
            await pipe.execute()

    async def get(self, ticket_id: str) -> Ticket | None:
        """One ticket, or None."""
        raw = await self.redis.get(keys.ticket(ticket_id))
        return orjson.loads(raw) if raw else None

    async def page(
        self, *, limit: int = 100, status: str | None = None, cursor: str | None = None, scan_limit: int = 5000
    ) -> TicketPage:
        """Up to `limit` tickets (of `status`), newest first, after `cursor`; the next page's cursor, if any.

        Tickets are filtered as they are read, so a flood of other tickets never hides matching ones; one page
        reads at most `scan_limit` tickets, and a page cut short there still hands out a cursor to go on.
        BadCursor for a cursor this server did not hand out.
        """
        after_id, after_score = _decode_cursor(cursor)
        found: list[Ticket] = []
        scanned = 0
        while True:
            batch = max(limit, 100)
            rows = await self._page(keys=[keys.TICKETS], args=[after_id, after_score, batch])
            pairs = [(rows[i].decode(), rows[i + 1].decode()) for i in range(0, len(rows), 2)]
            if not pairs:
                return TicketPage(found, None)
            raw = await self.redis.mget([keys.ticket(ticket_id) for ticket_id, _ in pairs])
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

    async def claim(self, session_id: str, ticket_id: str, pending_ms: int = 60_000) -> tuple[ClaimOutcome, str | None]:
        """Reserve the session's one open ticket: ("new", id), ("exists", id), ("limited", None) or ("gone", None).

        Atomic across processes: of concurrent escalations exactly one reserves; the rest see its ticket (or
        its reservation while the ticket is written). Counts against the session's client address.
        """
        status, value = await self._claim(
            keys=[keys.session(session_id)],
            args=[
                ticket_id,
                int(time.time() * 1000),
                keys.TICKET_PREFIX,
                pending_ms,
                self.tickets_per_client_per_hour,
                keys.TICKETS_PER_CLIENT_PREFIX,
            ],
        )
        found = value.decode() if isinstance(value, bytes) else str(value)
        outcomes: dict[int, ClaimOutcome] = {1: "new", 0: "exists", 2: "limited"}
        return outcomes.get(int(status), "gone"), found or None

    async def contact_changed(self, ticket_id: str, email: str) -> bool:
        """Whether `email` is new for this ticket (atomic: of concurrent identical requests one gets True).

        Only a digest of the address is kept, for the session's lifetime.
        """
        digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()
        previous = cast(
            "bytes | None", await self.redis.set(keys.ticket_contact(ticket_id), digest, ex=self.ttl_seconds, get=True)
        )
        return previous is None or keys.text(previous) != digest

    async def open_ticket_id(self, session_id: str) -> str | None:
        """The session's open ticket (or one being written), if any."""
        ticket_id = await self.redis.hget(keys.session(session_id), "ticketId")
        if ticket_id is None:
            return None
        ticket = await self.get(keys.text(ticket_id))
        return keys.text(ticket_id) if ticket is None or ticket.get("status") == "open" else None

    async def session_ticket_ids(self, session_id: str) -> list[str]:
        """Tickets opened for a session."""
        return sorted(keys.text(i) for i in await self.redis.smembers(keys.session_tickets(session_id)))

    async def of_session(self, session_id: str) -> list[Ticket]:
        """The tickets opened for a session, in id order."""
        found = [await self.get(ticket_id) for ticket_id in await self.session_ticket_ids(session_id)]
        return [ticket for ticket in found if ticket]

    async def forget_session(self, session_id: str) -> None:
        """The session is being deleted: its tickets keep no transcript, summary or contact (nor its digest)."""
        for ticket_id in await self.session_ticket_ids(session_id):
            raw = await self.redis.get(keys.ticket(ticket_id))
            if raw:
                ticket: dict[str, Any] = orjson.loads(raw)
                ticket.update(transcript=[], summary=None, contact=None, sessionDeleted=True)
                await self.redis.set(keys.ticket(ticket_id), orjson.dumps(ticket))
            await self.redis.delete(keys.ticket_contact(ticket_id))


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
        raise BadCursor(cursor) from None
    return ticket_id, score
