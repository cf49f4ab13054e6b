"""Every event the server sends to a room, in one place: services call a method, never name an event or a room.

Visitors of a session share the room named by its id on the default namespace; agents share `agents` on
`/agents`, and the agents holding a session share `session:<id>` there. Through the Socket.IO server's manager
an emit reaches those sockets on every process.

A recording fake for unit tests is an `Emitter` over any object with the server's `emit` coroutine
(`emit(event, data, room=..., namespace=...)`): it sees the events exactly as they go on the wire.
"""

from __future__ import annotations

import socketio

from server.contract import ChunkEvent, EscalationRecord, InterruptedEvent, Message, QueueEntry

CUSTOMERS_NAMESPACE = "/"
AGENTS_NAMESPACE = "/agents"
AGENTS_ROOM = "agents"  # every connected agent: the queue goes here


def held_room(session_id: str) -> str:
    """The /agents room of the agent(s) holding a session."""
    return f"session:{session_id}"


class Emitter:
    """One method per outgoing event; it owns the rooms and namespaces each one goes to."""

    __slots__ = ("_emit", "_sio")

    def __init__(self, sio: socketio.AsyncServer) -> None:
        self._sio = sio
        # Bound once (the chunk path calls it hundreds of times a second), and to the server's manager when there is
        # one: AsyncServer.emit only defaults the namespace (always given here) and logs at INFO before calling it.
        manager = getattr(sio, "manager", None)
        self._emit = manager.emit if isinstance(manager, socketio.AsyncManager) else sio.emit

    # To the visitors of a session ---------------------------------------------------------------
    async def message_chunk(self, chunk: ChunkEvent) -> None:
        """`message-chunk`: the next piece of the reply being written."""
        await self._emit("message-chunk", chunk, room=chunk["sessionId"], namespace=CUSTOMERS_NAMESPACE)

    async def message_interrupted(self, event: InterruptedEvent) -> None:
        """`message-interrupted`: a provider broke off mid-answer."""
        await self._emit("message-interrupted", event, room=event["sessionId"], namespace=CUSTOMERS_NAMESPACE)

    async def assistant_typing(self, session_id: str, typing: bool) -> None:
        """`assistant-typing`: the assistant started or stopped writing a reply."""
        await self._emit(
            "assistant-typing", {"sessionId": session_id, "typing": typing}, room=session_id, namespace=CUSTOMERS_NAMESPACE
        )

    async def message_received(self, message: Message, escalation: EscalationRecord | None = None) -> None:
        """`message-received`: a stored message (the last of a reply carries its escalation, if any)."""
        session_id = message["sessionId"]
        payload = {"sessionId": session_id, "message": message, "escalation": escalation}
        await self._emit("message-received", payload, room=session_id, namespace=CUSTOMERS_NAMESPACE)

    async def escalation_needed(self, escalation: EscalationRecord) -> None:
        """`escalation-needed`: the conversation needs a person, and why."""
        await self._emit("escalation-needed", escalation, room=escalation["sessionId"], namespace=CUSTOMERS_NAMESPACE)

    async def agent_joined(self, session_id: str, agent_name: str) -> None:
        """`agent-joined`: a person took the conversation."""
        payload = {"sessionId": session_id, "agentName": agent_name}
        await self._emit("agent-joined", payload, room=session_id, namespace=CUSTOMERS_NAMESPACE)

    async def agent_left(self, session_id: str, agent_name: str | None, reason: str) -> None:
        """`agent-left`: the person let go of the conversation (released, closed or idle)."""
        payload = {"sessionId": session_id, "agentName": agent_name, "reason": reason}
        await self._emit("agent-left", payload, room=session_id, namespace=CUSTOMERS_NAMESPACE)

    async def contact_requested(self, session_id: str) -> None:
        """`contact-requested`: nobody is free; the visitor is asked how to be reached."""
        await self._emit("contact-requested", {"sessionId": session_id}, room=session_id, namespace=CUSTOMERS_NAMESPACE)

    async def ticket_created(self, session_id: str, ticket_id: str) -> None:
        """`ticket-created`: the visitor's request is filed with their contact details."""
        payload = {"sessionId": session_id, "ticketId": ticket_id}
        await self._emit("ticket-created", payload, room=session_id, namespace=CUSTOMERS_NAMESPACE)

    # To agents ----------------------------------------------------------------------------------
    async def message_to_agents(self, message: Message) -> None:
        """`message-received` on /agents: a message of a conversation, to the agents holding it."""
        session_id = message["sessionId"]
        payload = {"sessionId": session_id, "message": message, "escalation": None}
        await self._emit("message-received", payload, room=held_room(session_id), namespace=AGENTS_NAMESPACE)

    async def message_to_everyone(self, message: Message) -> None:
        """`message-received` to the visitors and to the agents holding the conversation (agents' and system notes)."""
        session_id = message["sessionId"]
        payload = {"sessionId": session_id, "message": message, "escalation": None}
        await self._emit("message-received", payload, room=session_id, namespace=CUSTOMERS_NAMESPACE)
        await self._emit("message-received", payload, room=held_room(session_id), namespace=AGENTS_NAMESPACE)

    async def session_ended(self, session_id: str, reason: str) -> None:
        """`session-ended` on /agents: the agents holding it lose the conversation (released, closed, idle, expired)."""
        payload = {"sessionId": session_id, "reason": reason}
        await self._emit("session-ended", payload, room=held_room(session_id), namespace=AGENTS_NAMESPACE)

    async def queue_updated(self, queue: list[QueueEntry]) -> None:
        """`queue-updated` on /agents: the queue as it is now, to every agent."""
        await self._emit("queue-updated", {"queue": queue}, room=AGENTS_ROOM, namespace=AGENTS_NAMESPACE)

    # Rooms --------------------------------------------------------------------------------------
    async def join_session(self, sid: str, session_id: str) -> None:
        """A visitor's socket joined a session: it gets the session's events from now on."""
        await self._sio.enter_room(sid, session_id, namespace=CUSTOMERS_NAMESPACE)

    def listened_here(self, session_id: str) -> bool:
        """Whether a socket of this process is in the session's room."""
        return next(iter(self._sio.manager.get_participants(CUSTOMERS_NAMESPACE, session_id)), None) is not None

    async def join_agents(self, sid: str) -> None:
        """An agent's socket connected: it gets the queue from now on."""
        await self._sio.enter_room(sid, AGENTS_ROOM, namespace=AGENTS_NAMESPACE)

    async def join_held(self, sid: str, session_id: str) -> None:
        """An agent's socket holds a conversation: it gets the conversation's messages."""
        await self._sio.enter_room(sid, held_room(session_id), namespace=AGENTS_NAMESPACE)

    async def leave_held(self, sid: str, session_id: str) -> None:
        """An agent's socket let go of a conversation."""
        await self._sio.leave_room(sid, held_room(session_id), namespace=AGENTS_NAMESPACE)
