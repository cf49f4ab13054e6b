"""ChatService: what the edges may ask of the chat (send, stop, escalate, rejoin), over the turn queue and the writer.

A visitor's message goes: `submit` -> the session's turn queue (order, lock; turns.py) -> the responder (store,
answer, announce; responder.py). The reply leases let another process finish a reply whose process died.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from server.chat.escalation import Escalations
from server.chat.leases import ReplyLeases
from server.chat.reply_stream import ReplyListener
from server.chat.responder import ReplyWriter
from server.chat.turns import TurnQueue, TurnResult
from server.contract import InProgress, Message
from server.settings import ChatSettings
from server.storage.bundle import Storage
from server.storage.errors import STORAGE_DOWN
from server.storage.write_behind import WriteBehindStore


class ChatService:
    """The chat's public API; one message at a time per session, answered by the provider chain."""

    def __init__(
        self,
        *,
        turns: TurnQueue,
        writer: ReplyWriter,
        escalations: Escalations,
        leases: ReplyLeases,
        storage: Storage,
        store: WriteBehindStore,
        settings: ChatSettings,
    ) -> None:
        self._turns = turns
        self._writer = writer
        self._escalations = escalations
        self._leases = leases
        self._storage = storage
        self.store = store  # the write-behind buffer: the app drains it at shutdown, health reports its depth
        self._settings = settings

    async def submit(
        self,
        session_id: str,
        text: str,
        client_message_id: str | None = None,
        listener: ReplyListener | None = None,
        *,
        admit: Callable[[], Awaitable[Any]] | None = None,
        receivable: Callable[[], bool] | None = None,
    ) -> tuple[Message, asyncio.Future[TurnResult]]:
        """Queue a message behind the session's earlier ones; returns once it is stored, with the reply's future.

        The message's place in the queue is taken before anything is awaited, so arrival order is the order
        of storing and answering whatever `admit` (authentication, rate limits) awaits; if `admit` raises,
        the place is given up and the error goes to the caller. Beyond MAX_PENDING_PER_SESSION waiting messages
        the message is refused (`rate_limited`); a waiting message whose `receivable` says nobody can receive
        its ack or reply any more is dropped unstored when its turn comes.
        """
        return await self._turns.submit(session_id, text, client_message_id, listener, admit, receivable)

    async def escalate(self, session_id: str, reason: str | None) -> str | None:
        """The visitor asked for a person: None once escalated, else the state it already was in (nothing done)."""
        return await self._escalations.request(session_id, reason)

    def stop(self, session_id: str) -> bool:
        """Cancel the reply being written (its HTTP stream closes); the partial text is kept."""
        return self._writer.stop(session_id)

    async def rejoined(self, session_id: str, token: str) -> str:
        """A visitor came back: renew the session, and hand out a new token after an idle spell (None: half its life).

        Of two holders of one token only the first rejoin rotates it; the second is refused (`unauthorized`).
        While Redis is unreachable (the token was verified from this process's memory) neither can be done;
        the visitor keeps the token it has.
        """
        try:
            new_token = await self._storage.sessions.rotate_token_if_idle(session_id, token, self._settings.token_rotate_after)
            await self._storage.sessions.touch(session_id)
        except STORAGE_DOWN:
            return token
        return new_token or token

    async def history_for_join(self, session_id: str, after_id: str | None, limit: int) -> list[Message]:
        """What a (re)joining client missed; during an outage, what this process still holds of it."""
        try:
            return await self._storage.messages.messages_after(session_id, after_id, limit)
        except STORAGE_DOWN:
            recent = self.store.recent_messages(session_id)
            ids = [m.get("id") for m in recent]
            if after_id in ids:
                return recent[ids.index(after_id) + 1 :][:limit]
            return recent[-limit:]

    async def in_progress(self, session_id: str, history: Sequence[Message]) -> InProgress | None:
        """The reply still being written, for a rejoining client; None once it is in the history."""
        if self._writer.writing(session_id):
            return self._writer.written(session_id)
        if not self._settings.cross_process_order:  # one process: no reply is being written anywhere else
            return None
        try:
            snapshot = await self._storage.messages.in_flight(session_id)
        except STORAGE_DOWN:
            return None
        if snapshot is None or any(m.get("id") == snapshot["messageId"] for m in history):
            return None
        return {"messageId": snapshot["messageId"], "text": snapshot["text"], "index": snapshot["index"]}

    @property
    def providers(self) -> list[str]:
        """The providers that can answer now, in order (clients show them on join)."""
        return self._writer.provider_names

    @property
    def generating(self) -> list[str]:
        """Sessions with a reply being written in this process."""
        return self._writer.generating

    @property
    def busy_sessions(self) -> int:
        """Sessions with a message being handled in this process."""
        return self._turns.busy_sessions

    @property
    def waiting(self) -> int:
        """Messages queued in this process, the ones being handled included."""
        return self._turns.waiting

    def start(self) -> None:
        """Renew this process's reply leases and take over replies whose owner stopped renewing theirs."""
        self._leases.start(self._take_over)

    def _take_over(self, session_id: str, pending: dict[str, Any]) -> bool:
        """A dead process's reply, finished here before the session's next message (False once shutting down)."""
        if self._turns.closing:
            return False
        self._leases.hold(session_id)
        self._turns.push_recovery(session_id, pending, on_end=lambda: self._leases.drop(session_id))
        return True

    async def drain(self, timeout: float) -> None:
        """Shutdown: take no new message, let the replies being written finish within `timeout`, then cut them.

        Messages still queued (not stored, not acknowledged) are refused with `unavailable`; a reply cut at the
        deadline is stored as incomplete with a system message. Nothing new starts after this.
        """
        self._writer.shutting_down = True
        await self._turns.drain(timeout)
        await self._leases.stop()

    async def aclose(self) -> None:
        """Stop the lease tasks (when drain did not already)."""
        self._turns.close()
        self._writer.shutting_down = True
        await self._leases.stop()
