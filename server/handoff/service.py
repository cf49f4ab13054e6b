"""Handoff to people: the agents' queue, claims, live agent messages, timeouts and tickets."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from server.chat.escalation import Escalation
from server.chat.reply_stream import Broadcaster
from server.errors import ApiError
from server.handoff.summary import ConversationSummarizer
from server.ops.metrics import Metrics
from server.storage.sessions import SessionManager, new_id, now_iso

AGENTS_ROOM = "agents"
AGENTS_NAMESPACE = "/agents"
AGENT_FRESHNESS_MS = 15_000

EXPIRY_SCAN_SECONDS = 10  # how often the sweep looks for sessions that expired while queued or held


def agent_session_room(session_id: str) -> str:
    """The /agents room of the agent(s) holding a session."""
    return f"session:{session_id}"


class HandoffService:
    """Moves escalated conversations to people, across processes, with Redis as the referee."""

    def __init__(
        self,
        *,
        sessions: SessionManager,
        broadcaster: Broadcaster,
        summarizer: ConversationSummarizer,
        handoff_message: str,
        wait_timeout: float,
        idle_timeout: float,
        instance_id: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.sessions = sessions
        self.broadcaster = broadcaster
        self.summarizer = summarizer
        self.handoff_message = handoff_message
        self.wait_timeout = wait_timeout
        self.idle_timeout = idle_timeout
        self.instance_id = instance_id
        self.metrics = metrics or Metrics()
        self.local_agents: dict[str, str] = {}  # socket id -> agent name, on this process
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._last_expiry_scan_ms = 0
        self.expiry_scan_seconds = EXPIRY_SCAN_SECONDS

    # Escalation -------------------------------------------------------------------------
    async def on_escalation(self, escalation: Escalation) -> None:
        """Queue the conversation for an agent, or, with nobody online, ask for contact details and open a ticket."""
        session_id = escalation.session_id
        session = await self.sessions.get(session_id)
        if session is None or session.state in ("waiting_agent", "agent"):
            return
        if await self.sessions.agents_online(AGENT_FRESHNESS_MS) > 0:
            transcript = await self.sessions.transcript(session_id)
            entry = {
                "sessionId": session_id,
                "userId": session.user_id,
                "trigger": escalation.trigger,
                "reason": escalation.reason,
                "preview": [{"role": m["role"], "content": m["content"][:200]} for m in transcript[-3:] if m.get("content")],
                "waitingSince": now_iso(),
                "summary": None,
            }
            if await self.sessions.enqueue(session_id, entry):
                await self.sessions.set_session_fields(session_id, trigger=escalation.trigger, reason=escalation.reason)
                await self.post_system(session_id, self.handoff_message)
                await self.broadcast_queue()
                self._spawn(self._summarize_waiting(session_id))
            return
        await self._ticket_unless_limited(session_id, escalation.trigger, escalation.reason)

    async def _ticket_unless_limited(self, session_id: str, trigger: str, reason: str) -> None:
        """Open the ticket; a client over its ticket limit only gets the log line (its escalation is kept)."""
        try:
            await self.open_ticket(session_id, trigger, reason)
        except ApiError as err:
            if err.code != "rate_limited":
                raise

    async def _summarize_waiting(self, session_id: str) -> None:
        summary = await self.summarizer.summarize(session_id)
        await self.sessions.set_session_fields(session_id, summary=summary)
        if await self.sessions.update_queue_entry(session_id, summary=summary):
            await self.broadcast_queue()

    # Agents -----------------------------------------------------------------------------
    async def claim(self, agent_name: str, session_id: str) -> dict[str, Any]:
        """One agent wins; the winner gets transcript, trigger, reason and summary."""
        won, value = await self.sessions.claim(session_id, agent_name)
        if not won:
            state = value if isinstance(value, str) else ""
            if state == "agent":
                raise ApiError("validation_error", "Another agent already took this conversation.", {"sessionId": "claimed"})
            raise ApiError("not_found", "This conversation is not waiting for an agent.")
        entry = value if isinstance(value, dict) else {}
        if entry.get("waitingSince"):
            waited = datetime.now(tz=UTC) - datetime.fromisoformat(entry["waitingSince"].replace("Z", "+00:00"))
            self.metrics.handoff_wait.observe(max(0.0, waited.total_seconds()))
        fields = await self.sessions.session_fields(session_id, "summary", "trigger", "reason")
        transcript = await self.sessions.transcript(session_id)
        summary = fields["summary"] or entry.get("summary") or self.summarizer.fallback(transcript)
        await self.sessions.touch_agent_activity(session_id)
        await self.broadcaster.emit("agent-joined", {"sessionId": session_id, "agentName": agent_name}, session_id)
        await self.post_system(session_id, f"{agent_name} from our support team joined the chat.")
        await self.broadcast_queue()
        logger.info("session {}: claimed by agent {}", session_id, agent_name)
        return {
            "sessionId": session_id,
            "userId": entry.get("userId"),
            "trigger": fields["trigger"] or entry.get("trigger"),
            "reason": fields["reason"] or entry.get("reason"),
            "summary": summary,
            "transcript": await self.sessions.transcript(session_id),
        }

    async def agent_message(self, agent_name: str, session_id: str, text: str) -> dict[str, Any]:
        """An agent's words reach the customer as `message-received` with role `agent`."""
        if await self.sessions.agent_holder(session_id) != agent_name:
            raise ApiError("unauthorized", "You are not holding this conversation.")
        message = {
            "id": new_id(),
            "sessionId": session_id,
            "role": "agent",
            "content": text,
            "createdAt": now_iso(),
            "agentName": agent_name,
        }
        await self.sessions.append(session_id, message)
        await self.sessions.touch_agent_activity(session_id)
        payload = {"sessionId": session_id, "message": message, "escalation": None}
        await self.broadcaster.emit("message-received", payload, session_id)
        await self.broadcaster.emit("message-received", payload, agent_session_room(session_id), AGENTS_NAMESPACE)
        return message

    async def forward_customer_message(self, message: dict[str, Any]) -> None:
        """While an agent holds the session, the customer's messages go to the agent, not the AI."""
        payload = {"sessionId": message["sessionId"], "message": message, "escalation": None}
        await self.broadcaster.emit("message-received", payload, agent_session_room(message["sessionId"]), AGENTS_NAMESPACE)

    async def release(self, agent_name: str | None, session_id: str, *, why: str = "released") -> None:
        """Hand the conversation back to the AI."""
        await self._end_hold(agent_name, session_id, "active", why=why)

    async def close(self, agent_name: str, session_id: str, resolution: str) -> None:
        """End the conversation with a resolution."""
        await self._end_hold(agent_name, session_id, "closed", why="closed", resolution=resolution)

    async def _end_hold(
        self,
        agent_name: str | None,
        session_id: str,
        new_state: str,
        *,
        why: str,
        resolution: str | None = None,
        idle_cutoff_ms: int | None = None,
    ) -> bool:
        result = await self.sessions.release(session_id, agent_name, new_state, idle_cutoff_ms)
        if result == -1:
            raise ApiError("unauthorized", "You are not holding this conversation.")
        if result == 0:
            if agent_name is None:
                return False
            raise ApiError("not_found", "No agent holds this conversation.")
        if resolution is not None:
            await self.sessions.set_session_fields(session_id, resolution=resolution, closedAt=now_iso())
        name = agent_name or "The agent"
        await self.broadcaster.emit("agent-left", {"sessionId": session_id, "agentName": agent_name, "reason": why}, session_id)
        text = (
            f"{name} closed the conversation: {resolution}"
            if resolution is not None
            else f"{name} left the chat. The assistant is back to help you."
        )
        await self.post_system(session_id, text)
        await self.broadcaster.emit(
            "session-ended",
            {"sessionId": session_id, "reason": why},
            agent_session_room(session_id),
            AGENTS_NAMESPACE,
        )
        logger.info("session {}: agent hold ended ({})", session_id, why)
        return True

    # Tickets ----------------------------------------------------------------------------
    async def open_ticket(self, session_id: str, trigger: str, reason: str) -> dict[str, Any]:
        """Nobody took it: keep it as a ticket and ask the customer how to reach them.

        One open ticket per session (reserved atomically in Redis): an escalation while one is open, or being
        written, changes nothing and says nothing again. A client address over TICKETS_PER_CLIENT_PER_HOUR
        gets no ticket (rate_limited).
        """
        outcome, ticket_id = await self.sessions.claim_ticket(session_id, f"T-{secrets.token_hex(5).upper()}")
        if outcome == "exists" and ticket_id is not None:
            return await self.sessions.ticket(ticket_id) or {"id": ticket_id, "sessionId": session_id, "status": "open"}
        if outcome == "limited":
            logger.warning("session {}: no ticket opened: its client is over TICKETS_PER_CLIENT_PER_HOUR", session_id)
            raise ApiError("rate_limited", "Too many requests for our team from your network; try again later.", retry_after=300)
        if outcome != "new" or ticket_id is None:
            raise ApiError("not_found", "The session has ended.")
        session = await self.sessions.get(session_id)
        ticket = {
            "id": ticket_id,
            "sessionId": session_id,
            "userId": session.user_id if session else None,
            "status": "open",
            "trigger": trigger,
            "reason": reason,
            # Shutting down: no model call now (the transcript is kept); a summary would hold the exit up.
            "summary": None if self._stopping.is_set() else await self.summarizer.summarize(session_id),
            "transcript": await self.sessions.transcript(session_id),
            "contact": None,
            "createdAt": now_iso(),
            "updatedAt": now_iso(),
        }
        await self.sessions.save_ticket(ticket)  # the session's state and ticketId were set by the claim
        logger.info("session {}: ticket {} opened ({})", session_id, ticket["id"], trigger)
        await self.broadcaster.emit("contact-requested", {"sessionId": session_id}, session_id)
        await self.post_system(
            session_id,
            "Nobody from our team is free right now. Leave your email address and we'll get back to you; "
            "meanwhile I'm still here to help.",
        )
        return ticket

    async def provide_contact(self, session_id: str, email: str) -> dict[str, Any]:
        """The customer told us where to reach them: the ticket is complete."""
        ticket = await self._open_ticket_for(session_id)
        if ticket is None:
            ticket = await self._written(await self.open_ticket(session_id, "user_request", "The visitor left contact details."))
        if not await self.sessions.contact_changed(ticket["id"], email):  # said before: nothing new to announce
            return ticket
        ticket = ticket | {
            "contact": {"email": email},
            "transcript": await self.sessions.transcript(session_id),
            "updatedAt": now_iso(),
        }
        await self.sessions.save_ticket(ticket)
        await self.broadcaster.emit("ticket-created", {"sessionId": session_id, "ticketId": ticket["id"]}, session_id)
        await self.post_system(
            session_id,
            f"Thanks! Your request {ticket['id']} is with our support team, and we'll email you at {email} "
            "within one business day.",
        )
        return ticket

    async def resolve_ticket(self, ticket_id: str, agent_name: str, resolution: str | None) -> dict[str, Any]:
        """Close a ticket."""
        ticket = await self.sessions.ticket(ticket_id)
        if ticket is None:
            raise ApiError("not_found", "No such ticket.")
        ticket = ticket | {
            "status": "resolved",
            "resolution": resolution,
            "resolvedBy": agent_name,
            "resolvedAt": now_iso(),
            "updatedAt": now_iso(),
        }
        await self.sessions.save_ticket(ticket)
        return ticket

    async def _written(self, ticket: dict[str, Any], wait: float = 30.0) -> dict[str, Any]:
        """The stored ticket, waiting (bounded) while another request is still writing it (its summary)."""
        deadline = time.monotonic() + wait
        while "transcript" not in ticket:
            if time.monotonic() > deadline:
                raise ApiError("unavailable", "Your request is still being filed; please retry.", retry_after=2)
            await asyncio.sleep(0.1)
            ticket = await self.sessions.ticket(ticket["id"]) or ticket
        return ticket

    async def _open_ticket_for(self, session_id: str) -> dict[str, Any] | None:
        for ticket_id in reversed(await self.sessions.session_ticket_ids(session_id)):
            ticket = await self.sessions.ticket(ticket_id)
            if ticket is not None and ticket.get("status") == "open":
                return ticket
        return None

    # Shared helpers ---------------------------------------------------------------------
    async def post_system(self, session_id: str, text: str) -> dict[str, Any]:
        """A system note in the conversation, stored and shown to everyone in it."""
        message = {"id": new_id(), "sessionId": session_id, "role": "system", "content": text, "createdAt": now_iso()}
        await self.sessions.append(session_id, message)
        payload = {"sessionId": session_id, "message": message, "escalation": None}
        await self.broadcaster.emit("message-received", payload, session_id)
        await self.broadcaster.emit("message-received", payload, agent_session_room(session_id), AGENTS_NAMESPACE)
        return message

    async def broadcast_queue(self) -> None:
        """Every agent on every process sees the queue as it is now."""
        await self.broadcaster.emit("queue-updated", {"queue": await self.sessions.queue()}, AGENTS_ROOM, AGENTS_NAMESPACE)

    async def agent_connected(self, sid: str, name: str) -> None:
        self.local_agents[sid] = name
        await self.sessions.agent_seen(f"{self.instance_id}:{sid}", online=True)

    async def agent_disconnected(self, sid: str) -> None:
        self.local_agents.pop(sid, None)
        await self.sessions.agent_seen(f"{self.instance_id}:{sid}", online=False)

    # Timers -----------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Tickets for waits past AGENT_WAIT_TIMEOUT, the AI back after AGENT_IDLE_TIMEOUT; refresh our agents."""
        for sid in list(self.local_agents):
            await self.sessions.agent_seen(f"{self.instance_id}:{sid}", online=True)
        now_ms = int(time.time() * 1000)
        wait_cutoff = now_ms - int(self.wait_timeout * 1000)
        idle_cutoff = now_ms - int(self.idle_timeout * 1000)
        # A session that expired while queued or held leaves nothing behind for anyone to claim or sweep. Sessions
        # live SESSION_TIMEOUT (minutes), so looking every EXPIRY_SCAN_SECONDS is enough (it reads up to 400 keys).
        expired: list[str] = []
        if now_ms - self._last_expiry_scan_ms >= self.expiry_scan_seconds * 1000:
            self._last_expiry_scan_ms = now_ms
            expired = await self.sessions.drop_expired_handoffs()
        for session_id in expired:
            logger.info("session {}: expired while queued or held; its queue and hold entries removed", session_id)
            await self.broadcaster.emit(
                "session-ended", {"sessionId": session_id, "reason": "expired"}, agent_session_room(session_id), AGENTS_NAMESPACE
            )
        waiting, idle = await self.sessions.overdue(wait_cutoff, idle_cutoff)
        changed = bool(expired)
        for session_id in waiting:
            entry = await self.sessions.take_overdue_waiting(session_id, wait_cutoff)
            if entry is None:
                continue
            changed = True
            await self._ticket_unless_limited(
                session_id, entry.get("trigger", "error"), entry.get("reason", "No agent was free.")
            )
        if changed:
            await self.broadcast_queue()
        for session_id in idle:
            await self._end_hold(None, session_id, "active", why="idle", idle_cutoff_ms=idle_cutoff)

    async def run_sweeper(self, interval: float = 1.0) -> None:
        """The timer loop; every process runs one, Redis scripts make sure each expiry happens once."""
        failing = False
        while not self._stopping.is_set():
            try:
                await self.sweep()
            except Exception as err:
                if not failing:  # once per outage, not once a second
                    logger.warning("handoff sweep failed: {} (retrying every {:g} s)", type(err).__name__, interval)
                failing = True
            else:
                if failing:
                    logger.info("handoff sweep works again")
                failing = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    def stop_sweeper(self) -> None:
        """Ask the timer loop to finish its current sweep and stop (never cut a Redis call in half)."""
        self._stopping.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel background summaries."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
