"""System notes: the lines the server itself adds to a conversation (an agent joined, a ticket was filed, ...)."""

from __future__ import annotations

from server.contract import Message, new_message
from server.realtime.emitter import Emitter
from server.storage.messages import MessageStore


class SystemNotes:
    """Stores a system note in the conversation and shows it to everyone in it, visitors and agents."""

    def __init__(self, messages: MessageStore, emitter: Emitter) -> None:
        self._messages = messages
        self._emitter = emitter

    async def post(self, session_id: str, text: str) -> Message:
        """A system note, stored, then sent to the session's visitors and to the agents holding it."""
        message = new_message(session_id, "system", text)
        await self._messages.append(session_id, message)
        await self._emitter.message_to_everyone(message)
        return message
