"""Tickets: a conversation nobody could take is kept with its transcript, and the visitor says how to reach them."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import cast

from loguru import logger

from server.contract import Ticket, Trigger, now_iso
from server.errors import ApiError
from server.handoff.notes import SystemNotes
from server.handoff.summary import ConversationSummarizer
from server.realtime.emitter import Emitter
from server.storage.errors import SessionGone
from server.storage.messages import MessageStore
from server.storage.sessions import SessionStore
from server.storage.tickets import TicketStore

CONTACT_REQUEST = (
    "Nobody from our team is free right now. Leave your email address and we'll get back to you; "
    "meanwhile I'm still here to help."
)


class TicketDesk:
    """Opens one ticket per conversation, completes it with the visitor's contact, and resolves it."""

    def __init__(
        self,
        tickets: TicketStore,
        sessions: SessionStore,
        messages: MessageStore,
        emitter: Emitter,
        summarizer: ConversationSummarizer,
    ) -> None:
        self._tickets = tickets
        self._sessions = sessions
        self._messages = messages
        self._emitter = emitter
        self._summarizer = summarizer
        self._notes = SystemNotes(messages, emitter)
        self.shutting_down = False  # set at shutdown: tickets are filed without a summary (no model call then)

    async def open(self, session_id: str, trigger: str, reason: str) -> Ticket:
        """Nobody took it: keep it as a ticket and ask the customer how to reach them.

        One open ticket per session (reserved atomically in Redis): an escalation while one is open, or being
        written, changes nothing and says nothing again. A client address over TICKETS_PER_CLIENT_PER_HOUR
        gets no ticket (rate_limited).
        """
        outcome, ticket_id = await self._tickets.claim(session_id, f"T-{secrets.token_hex(5).upper()}")
        if outcome == "exists" and ticket_id is not None:
            stored = await self._tickets.get(ticket_id)
            # Still being written by another request: what is known of it so far (its id, above all).
            return stored or cast(Ticket, {"id": ticket_id, "sessionId": session_id, "status": "open"})
        if outcome == "limited":
            logger.warning("session {}: no ticket opened: its client is over TICKETS_PER_CLIENT_PER_HOUR", session_id)
            raise ApiError("rate_limited", "Too many requests for our team from your network; try again later.", retry_after=300)
        if outcome != "new" or ticket_id is None:
            raise SessionGone(session_id)  # the edges answer not_found, "The session has ended."
        session = await self._sessions.get(session_id)
        ticket: Ticket = {
            "id": ticket_id,
            "sessionId": session_id,
            "userId": session.user_id if session else None,
            "status": "open",
            "trigger": trigger,
            "reason": reason,
            # Shutting down: no model call now (the transcript is kept); a summary would hold the exit up.
            "summary": None if self.shutting_down else await self._summarizer.summarize(session_id),
            "transcript": await self._messages.transcript(session_id),
            "contact": None,
            "createdAt": now_iso(),
            "updatedAt": now_iso(),
        }
        await self._tickets.save(ticket)  # the session's state and ticketId were set by the claim
        logger.info("session {}: ticket {} opened ({})", session_id, ticket["id"], trigger)
        await self._emitter.contact_requested(session_id)
        await self._notes.post(session_id, CONTACT_REQUEST)
        return ticket

    async def open_unless_limited(self, session_id: str, trigger: str, reason: str) -> None:
        """Open the ticket; a client over its ticket limit only gets the log line (its escalation is kept)."""
        try:
            await self.open(session_id, trigger, reason)
        except ApiError as err:
            if err.code != "rate_limited":
                raise

    async def provide_contact(self, session_id: str, email: str) -> Ticket:
        """The customer told us where to reach them: the ticket is complete."""
        ticket = await self._open_ticket_of(session_id)
        if ticket is None:
            ticket = await self._written(await self.open(session_id, Trigger.USER_REQUEST, "The visitor left contact details."))
        if not await self._tickets.contact_changed(ticket["id"], email):  # said before: nothing new to announce
            return ticket
        ticket = ticket | {
            "contact": {"email": email},
            "transcript": await self._messages.transcript(session_id),
            "updatedAt": now_iso(),
        }
        await self._tickets.save(ticket)
        await self._emitter.ticket_created(session_id, ticket["id"])
        await self._notes.post(
            session_id,
            f"Thanks! Your request {ticket['id']} is with our support team, and we'll email you at {email} "
            "within one business day.",
        )
        return ticket

    async def resolve(self, ticket_id: str, agent_name: str, resolution: str | None) -> Ticket:
        """Close a ticket."""
        ticket = await self._tickets.get(ticket_id)
        if ticket is None:
            raise ApiError("not_found", "No such ticket.")
        ticket = ticket | {
            "status": "resolved",
            "resolution": resolution,
            "resolvedBy": agent_name,
            "resolvedAt": now_iso(),
            "updatedAt": now_iso(),
        }
        await self._tickets.save(ticket)
        return ticket

    async def _written(self, ticket: Ticket, wait: float = 30.0) -> Ticket:
        """The stored ticket, waiting (bounded) while another request is still writing it (its summary)."""
        deadline = time.monotonic() + wait
        while "transcript" not in ticket:
            if time.monotonic() > deadline:
                raise ApiError("unavailable", "Your request is still being filed; please retry.", retry_after=2)
            await asyncio.sleep(0.1)
            ticket = await self._tickets.get(ticket["id"]) or ticket
        return ticket

    async def _open_ticket_of(self, session_id: str) -> Ticket | None:
        for ticket_id in reversed(await self._tickets.session_ticket_ids(session_id)):
            ticket = await self._tickets.get(ticket_id)
            if ticket is not None and ticket.get("status") == "open":
                return ticket
        return None
