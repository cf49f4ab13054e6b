"""Handoff to people: the agents' queue, claims, live agent messages and the end of a hold.

Tickets (nobody free) are in tickets.py, the timers in sweeper.py; HandoffService builds both and decides,
per escalation, between the queue and a ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from server.chat.escalation import Escalation
from server.contract import HELD_BY_PEOPLE, Message, PreviewLine, QueueEntry, SessionState, new_message, now_iso
from server.errors import ApiError
from server.handoff.notes import SystemNotes
from server.handoff.summary import ConversationSummarizer
from server.handoff.sweeper import Sweeper
from server.handoff.tickets import TicketDesk
from server.ops.metrics import Metrics
from server.realtime.emitter import Emitter
from server.settings import HandoffSettings
from server.storage.bundle import Storage

AGENT_FRESHNESS_MS = 15_000
PREVIEW_LINES = 3
PREVIEW_CHARS = 200


class HandoffService:
    """Moves escalated conversations to people, across processes, with Redis as the referee."""

    def __init__(
        self,
        *,
        storage: Storage,
        emitter: Emitter,
        summarizer: ConversationSummarizer,
        settings: HandoffSettings,
        instance_id: str,
        metrics: Metrics,
    ) -> None:
        self._storage = storage
        self._emitter = emitter
        self._summarizer = summarizer
        self._settings = settings
        self._instance_id = instance_id
        self._metrics = metrics
        self._notes = SystemNotes(storage.messages, emitter)
        self.tickets = TicketDesk(storage.tickets, storage.sessions, storage.messages, emitter, summarizer)
        self.sweeper = Sweeper(self, self.tickets, queue=storage.queue, emitter=emitter, settings=settings)
        self._local_agents: dict[str, str] = {}  # socket id -> agent name, on this process
        self._tasks: set[asyncio.Task[Any]] = set()

    # Escalation -------------------------------------------------------------------------
    async def on_escalation(self, escalation: Escalation) -> None:
        """Queue the conversation for an agent, or, with nobody online, ask for contact details and open a ticket."""
        session_id = escalation.session_id
        session = await self._storage.sessions.get(session_id)
        if session is None or session.state in HELD_BY_PEOPLE:
            return
        if await self._storage.queue.agents_online(AGENT_FRESHNESS_MS) > 0:
            transcript = await self._storage.messages.transcript(session_id)
            preview: list[PreviewLine] = [
                {"role": m["role"], "content": m["content"][:PREVIEW_CHARS]}
                for m in transcript[-PREVIEW_LINES:]
                if m.get("content")
            ]
            entry: QueueEntry = {
                "sessionId": session_id,
                "userId": session.user_id,
                "trigger": escalation.trigger,
                "reason": escalation.reason,
                "preview": preview,
                "waitingSince": now_iso(),
                "summary": None,
                "language": session.language,
            }
            if await self._storage.queue.enqueue(session_id, entry):
                await self._storage.sessions.set_fields(session_id, trigger=escalation.trigger, reason=escalation.reason)
                await self._notes.post(session_id, self._settings.message)
                await self.broadcast_queue()
                self._spawn(self._summarize_waiting(session_id))
            return
        await self.tickets.open_unless_limited(session_id, escalation.trigger, escalation.reason)

    async def _summarize_waiting(self, session_id: str) -> None:
        summary = await self._summarizer.summarize(session_id)
        await self._storage.sessions.set_fields(session_id, summary=summary)
        if await self._storage.queue.update_entry(session_id, summary=summary):
            await self.broadcast_queue()

    # Agents -----------------------------------------------------------------------------
    async def queue(self) -> list[QueueEntry]:
        """The conversations waiting for an agent, oldest first."""
        return await self._storage.queue.entries()

    async def held_by(self, agent_name: str) -> list[str]:
        """The sessions an agent holds (a reconnecting agent goes back into them)."""
        return await self._storage.queue.held_by(agent_name)

    async def claim(self, agent_name: str, session_id: str) -> dict[str, Any]:
        """One agent wins; the winner gets transcript, trigger, reason and summary."""
        claim = await self._storage.queue.claim(session_id, agent_name)
        if not claim.won:
            if claim.state == SessionState.AGENT:
                raise ApiError("validation_error", "Another agent already took this conversation.", {"sessionId": "claimed"})
            raise ApiError("not_found", "This conversation is not waiting for an agent.")
        entry: Mapping[str, Any] = claim.entry or {}  # an entry may be gone (its session claimed from elsewhere)
        if entry.get("waitingSince"):
            waited = datetime.now(tz=UTC) - datetime.fromisoformat(entry["waitingSince"].replace("Z", "+00:00"))
            self._metrics.handoff_wait.observe(max(0.0, waited.total_seconds()))
        fields = await self._storage.sessions.fields(session_id, "summary", "trigger", "reason", "language")
        transcript = await self._storage.messages.transcript(session_id)
        summary = fields["summary"] or entry.get("summary") or self._summarizer.fallback(transcript)
        await self._storage.queue.touch_agent_activity(session_id)
        await self._emitter.agent_joined(session_id, agent_name)
        await self._notes.post(session_id, f"{agent_name} from our support team joined the chat.")
        await self.broadcast_queue()
        logger.info("session {}: claimed by agent {}", session_id, agent_name)
        return {
            "sessionId": session_id,
            "userId": entry.get("userId"),
            "trigger": fields["trigger"] or entry.get("trigger"),
            "reason": fields["reason"] or entry.get("reason"),
            "summary": summary,
            "language": fields["language"] or entry.get("language"),
            "transcript": await self._storage.messages.transcript(session_id),
        }

    async def agent_message(self, agent_name: str, session_id: str, text: str) -> Message:
        """An agent's words reach the customer as `message-received` with role `agent`."""
        if await self._storage.queue.holder(session_id) != agent_name:
            raise ApiError("unauthorized", "You are not holding this conversation.")
        message = new_message(session_id, "agent", text, agentName=agent_name)
        await self._storage.messages.append(session_id, message)
        await self._storage.queue.touch_agent_activity(session_id)
        await self._emitter.message_to_everyone(message)
        return message

    async def release(self, agent_name: str | None, session_id: str, *, why: str = "released") -> None:
        """Hand the conversation back to the AI."""
        await self._end_hold(agent_name, session_id, SessionState.ACTIVE, why=why)

    async def close(self, agent_name: str, session_id: str, resolution: str) -> None:
        """End the conversation with a resolution."""
        await self._end_hold(agent_name, session_id, SessionState.CLOSED, why="closed", resolution=resolution)

    async def end_idle_hold(self, session_id: str, idle_cutoff_ms: int) -> None:
        """The agent went silent past AGENT_IDLE_TIMEOUT: the AI is back (unless the agent spoke meanwhile)."""
        await self._end_hold(None, session_id, SessionState.ACTIVE, why="idle", idle_cutoff_ms=idle_cutoff_ms)

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
        result = await self._storage.queue.release(session_id, agent_name, new_state, idle_cutoff_ms)
        if result == -1:
            raise ApiError("unauthorized", "You are not holding this conversation.")
        if result == 0:
            if agent_name is None:
                return False
            raise ApiError("not_found", "No agent holds this conversation.")
        if resolution is not None:
            await self._storage.sessions.set_fields(session_id, resolution=resolution, closedAt=now_iso())
        name = agent_name or "The agent"
        await self._emitter.agent_left(session_id, agent_name, why)
        text = (
            f"{name} closed the conversation: {resolution}"
            if resolution is not None
            else f"{name} left the chat. The assistant is back to help you."
        )
        await self._notes.post(session_id, text)
        await self._emitter.session_ended(session_id, why)
        logger.info("session {}: agent hold ended ({})", session_id, why)
        return True

    async def broadcast_queue(self) -> None:
        """Every agent on every process sees the queue as it is now."""
        await self._emitter.queue_updated(await self.queue())

    # Presence ---------------------------------------------------------------------------
    async def agent_connected(self, sid: str, name: str) -> None:
        """An agent's socket connected here: it counts as online (for queue or ticket) while this process lives."""
        self._local_agents[sid] = name
        await self._storage.queue.agent_seen(f"{self._instance_id}:{sid}", online=True)

    async def agent_disconnected(self, sid: str) -> None:
        """An agent's socket left."""
        self._local_agents.pop(sid, None)
        await self._storage.queue.agent_seen(f"{self._instance_id}:{sid}", online=False)

    async def refresh_presence(self) -> None:
        """This process's agents are still here (presence fades after AGENT_FRESHNESS_MS without this)."""
        for sid in list(self._local_agents):
            await self._storage.queue.agent_seen(f"{self._instance_id}:{sid}", online=True)

    # Lifecycle --------------------------------------------------------------------------
    async def run_sweeper(self) -> None:
        """The timer loop (see sweeper.py)."""
        await self.sweeper.run()

    def stop_sweeper(self) -> None:
        """Shutting down: the timers stop after their current sweep, and tickets are filed without a summary."""
        self.tickets.shutting_down = True
        self.sweeper.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
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
