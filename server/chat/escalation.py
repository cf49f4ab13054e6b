"""Escalation in one place: the rules that say when a conversation needs a person, and what follows when it does."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from loguru import logger

from server.contract import HELD_BY_PEOPLE, EscalationRecord, SessionState, Trigger, now_iso
from server.ops.metrics import Metrics
from server.realtime.emitter import Emitter
from server.storage.errors import STORAGE_DOWN
from server.storage.sessions import SessionStore
from server.storage.tickets import TicketStore
from server.storage.write_behind import WriteBehindStore

if TYPE_CHECKING:  # the handoff service takes Escalation objects: a type-only import, no cycle
    from server.handoff.service import HandoffService


@dataclass(frozen=True, slots=True)
class Escalation:
    """The contract's Escalation object."""

    session_id: str
    trigger: Trigger
    reason: str
    created_at: str

    def to_dict(self) -> EscalationRecord:
        """As clients receive it."""
        return {"sessionId": self.session_id, "trigger": self.trigger, "reason": self.reason, "createdAt": self.created_at}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Escalation:
        """Back from its stored (or buffered) form."""
        return cls(record["sessionId"], Trigger(record["trigger"]), record["reason"], record.get("createdAt") or now_iso())


class EscalationRules:
    """Decides the four contract triggers; the chat service only asks."""

    def __init__(self, keywords: tuple[str, ...], confidence_threshold: float) -> None:
        self.confidence_threshold = confidence_threshold
        words = [(keyword, r"\s+".join(map(re.escape, keyword.split()))) for keyword in keywords if keyword.strip()]
        self._keywords = [(keyword, re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)) for keyword, body in words]
        # Whether any keyword is there at all, in one scan (a sixth of the time of one search per keyword): most
        # messages have none. It matches exactly when one of the patterns above would.
        alternatives = "|".join(body for _, body in words)
        self._any = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)" if words else "(?!)", re.IGNORECASE)

    def keyword_in(self, text: str) -> str | None:
        """The first escalation keyword (in the configured order) found as a whole word, in any case."""
        if self._any.search(text) is None:
            return None
        for keyword, pattern in self._keywords:
            if pattern.search(text):
                return keyword
        return None

    def for_user_message(self, session_id: str, text: str) -> Escalation | None:
        """A keyword in what the visitor wrote."""
        keyword = self.keyword_in(text)
        if keyword is None:
            return None
        return Escalation(session_id, Trigger.KEYWORD, f"The message mentions “{keyword}”.", now_iso())

    def for_reply(self, session_id: str, confidence: float | None) -> Escalation | None:
        """A reply the model itself was unsure of; no signal (None) never counts as low."""
        if confidence is None or confidence >= self.confidence_threshold:
            return None
        return Escalation(
            session_id,
            Trigger.LOW_CONFIDENCE,
            f"The answer's confidence {confidence:.2f} is below {self.confidence_threshold:.2f}.",
            now_iso(),
        )

    @staticmethod
    def for_failure(session_id: str, reason: str = "Every AI provider failed.") -> Escalation:
        """No provider could answer."""
        return Escalation(session_id, Trigger.ERROR, reason, now_iso())

    @staticmethod
    def for_user_request(session_id: str, reason: str | None) -> Escalation:
        """The visitor asked for a person."""
        return Escalation(session_id, Trigger.USER_REQUEST, reason or "The visitor asked for a human.", now_iso())


class Escalations:
    """What follows an escalation: counted, announced to the room, kept with the session, and a person brought in."""

    def __init__(
        self,
        rules: EscalationRules,
        *,
        sessions: SessionStore,
        tickets: TicketStore,
        store: WriteBehindStore,
        emitter: Emitter,
        metrics: Metrics,
        handoff: HandoffService,
    ) -> None:
        self.rules = rules
        self._sessions = sessions
        self._tickets = tickets
        self._store = store
        self._emitter = emitter
        self._metrics = metrics
        self._handoff = handoff
        self._requested: set[str] = set()  # sessions whose escalation this process is handling now
        store.on_replay("escalation", self._keep)

    async def request(self, session_id: str, reason: str | None) -> str | None:
        """The visitor asked for a person: None once escalated, or the state it already was in (nothing done).

        Idempotent while the session waits for, has, or has an open ticket for a person, and while another
        request of it is being handled (`escalating`).
        """
        if session_id in self._requested:  # taken before any await: concurrent requests see it at once
            return "escalating"
        self._requested.add(session_id)
        try:
            state = await self._with_people(session_id)
            if state is not None:
                return state
            await self.announce(self.rules.for_user_request(session_id, reason))
        finally:
            self._requested.discard(session_id)
        return None

    async def _with_people(self, session_id: str) -> str | None:
        """The session's state when it is already with people (queue, agent, open ticket), else None."""
        try:
            session = await self._sessions.get(session_id)
            if session is None or session.state in HELD_BY_PEOPLE:
                return None if session is None else session.state
            if session.state == SessionState.TICKET and await self._tickets.open_ticket_id(session_id) is not None:
                return SessionState.TICKET.value
        except STORAGE_DOWN:
            return None  # the escalation is buffered with the messages, as before
        return None

    async def announce(self, escalation: Escalation) -> None:
        """Tell the room, then keep it and bring in a person now or (Redis unreachable) once Redis is back, in order."""
        record = escalation.to_dict()
        self._metrics.child(self._metrics.escalations, escalation.trigger).inc()
        await self._emitter.escalation_needed(record)
        logger.info("session {}: escalated ({}): {}", escalation.session_id, escalation.trigger, escalation.reason)
        await self._store.run_or_defer("escalation", escalation.session_id, cast("dict[str, Any]", record))

    async def _keep(self, session_id: str, body: dict[str, Any]) -> None:
        """Keep an escalation with the session, count it, and bring in a person (queue or ticket)."""
        escalation = Escalation.from_record({**body, "sessionId": session_id})
        await self._sessions.record_escalation(session_id, escalation.to_dict())
        await self._handoff.on_escalation(escalation)
