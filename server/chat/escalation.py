"""Escalation in one place: the rules that say when a conversation needs a person, and what follows when it does."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from loguru import logger

from server.ai.retrieval import Verdict
from server.chat.sentiment import ANGRY_AT_MOST, NEUTRAL, Mood, SentimentReader
from server.contract import HELD_BY_PEOPLE, EscalationRecord, SessionState, Trigger, now_iso
from server.ops.metrics import Metrics
from server.realtime.emitter import Emitter
from server.settings import PERSON_KEYWORDS, EscalationSettings
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


OUT_OF_SCOPE = frozenset({Verdict.OFF_TOPIC, Verdict.SMALL_TALK})  # answered with a scope note; never a person


@dataclass(frozen=True, slots=True)
class Signals:
    """What one answered message says for the counts in a row: a miss or an answer (None: neither), a negative
    message or not, and the message's mood."""

    miss: bool | None
    negative: bool | None
    mood: Mood


class EscalationRules:
    """Decides the contract's triggers; the chat layer only asks.

    - `keyword`: a visitor asking for a person ("human", "agent", ...) or a severe word (lawyer, fraud, ...);
      ordinary support words ("refund") are answered, not escalated.
    - `low_confidence`: an in-scope question answered below the threshold (a miss), by default the second miss in
      a row (the visitor rephrased once and it still failed); off-topic and small talk never count.
    - `sentiment`: the visitor reads clearly upset (very negative, or angry words; with SENTIMENT_MODEL=provider, the
      model's upset score when it answered in time), or negative again and again.
    - `error` and `user_request`: every provider failed; the visitor pressed "Talk to a person".
    """

    def __init__(
        self,
        keywords: tuple[str, ...],
        confidence_threshold: float,
        *,
        misses_in_a_row: int = 1,
        sentiment: SentimentReader | None = None,
        sentiment_threshold: float = -1.0,
        negative_threshold: float = -0.5,
        negatives_in_a_row: int = 0,
        model_threshold: float = 0.8,
    ) -> None:
        self.confidence_threshold = confidence_threshold
        self.misses_in_a_row = max(1, misses_in_a_row)
        self._sentiment = sentiment
        self.sentiment_threshold = sentiment_threshold
        self.negative_threshold = negative_threshold
        self.negatives_in_a_row = max(0, negatives_in_a_row)
        self.model_threshold = model_threshold
        self._person = {keyword.lower() for keyword in PERSON_KEYWORDS}
        words = [(keyword, r"\s+".join(map(re.escape, keyword.split()))) for keyword in keywords if keyword.strip()]
        self._keywords = [(keyword, re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)) for keyword, body in words]
        # Whether any keyword is there at all, in one scan (a sixth of the time of one search per keyword): most
        # messages have none. It matches exactly when one of the patterns above would.
        alternatives = "|".join(body for _, body in words)
        self._any = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)" if words else "(?!)", re.IGNORECASE)

    @classmethod
    def from_settings(cls, settings: EscalationSettings, sentiment: SentimentReader | None = None) -> EscalationRules:
        """The rules as configured (SentimentReader: the sentiment trigger is on)."""
        return cls(
            settings.keywords,
            settings.confidence_threshold,
            misses_in_a_row=settings.misses_in_a_row,
            sentiment=sentiment,
            sentiment_threshold=settings.sentiment_threshold,
            negative_threshold=settings.negative_threshold,
            negatives_in_a_row=settings.negatives_in_a_row,
            model_threshold=settings.model_threshold,
        )

    def keyword_in(self, text: str) -> str | None:
        """The first escalation keyword (in the configured order) found as a whole word, in any case."""
        if self._any.search(text) is None:
            return None
        for keyword, pattern in self._keywords:
            if pattern.search(text):
                return keyword
        return None

    def for_user_message(self, session_id: str, text: str) -> Escalation | None:
        """A keyword in what the visitor wrote: asking for a person, or a word too serious for the AI alone."""
        keyword = self.keyword_in(text)
        if keyword is None:
            return None
        if keyword.lower() in self._person:
            reason = f"The visitor asks for a person (“{keyword}”)."
        else:
            reason = f"The message mentions “{keyword}”."
        return Escalation(session_id, Trigger.KEYWORD, reason, now_iso())

    def signals(self, text: str, confidence: float | None, verdict: Verdict | None) -> Signals:
        """What an answered message counts for: a miss (in scope, below the threshold) or an answer (at or above
        it) (no confidence signal, off-topic or small talk: neither), and whether the visitor's message reads
        negative (None: the sentiment trigger is off)."""
        if confidence is None or verdict in OUT_OF_SCOPE:
            miss = None
        else:
            miss = confidence < self.confidence_threshold
        if self._sentiment is None:
            return Signals(miss, None, NEUTRAL)
        mood = self._sentiment.read(text)
        negative = mood.score <= self.negative_threshold or (mood.angry_words and mood.score <= ANGRY_AT_MOST)
        return Signals(miss, negative, mood)

    def for_sentiment(self, session_id: str, mood: Mood, negatives: int | None, upset: float | None = None) -> Escalation | None:
        """A visitor who reads clearly upset now, or negative `negatives_in_a_row` times in a row.

        `upset`: the model's score (0..1, SENTIMENT_MODEL=provider) when it answered in time; it then decides "upset
        now" instead of the lexicon (None: the lexicon decides). The lexicon's negatives in a row count either way.
        """
        if self._sentiment is None:
            return None
        if upset is not None:
            if upset >= self.model_threshold:
                # the model's score stays in the server (debug log), never in what the room is sent
                logger.debug("session {}: sentiment model score {:.2f} escalates", session_id, upset)
                reason = "The visitor's message reads upset to the sentiment model."
                return Escalation(session_id, Trigger.SENTIMENT, reason, now_iso())
        elif self.sentiment_threshold > -1.0:
            if mood.score <= self.sentiment_threshold:
                reason = f"The visitor's message reads very negative (sentiment {mood.score:.2f})."
                return Escalation(session_id, Trigger.SENTIMENT, reason, now_iso())
            if mood.angry_words and mood.score <= ANGRY_AT_MOST:
                reason = f"The visitor sounds upset: words of anger or insult (sentiment {mood.score:.2f})."
                return Escalation(session_id, Trigger.SENTIMENT, reason, now_iso())
        if self.negatives_in_a_row and negatives is not None and negatives >= self.negatives_in_a_row:
            reason = f"The visitor's last {negatives} messages in a row read negative (sentiment {mood.score:.2f})."
            return Escalation(session_id, Trigger.SENTIMENT, reason, now_iso())
        return None

    def for_reply(
        self, session_id: str, confidence: float | None, *, misses: int | None = None, verdict: Verdict | None = None
    ) -> Escalation | None:
        """A reply the assistant was unsure of, to an in-scope question: escalated at the `misses_in_a_row`-th miss
        in a row (`misses`: the count with this one; None unknown, which escalates only when one miss is enough).
        No signal (None) never counts as low; off-topic and small talk never escalate."""
        if verdict in OUT_OF_SCOPE or confidence is None or confidence >= self.confidence_threshold:
            return None
        needed = self.misses_in_a_row
        if needed > 1 and (misses is None or misses < needed):
            return None
        if needed > 1:
            reason = (
                f"{_ordinal(misses or needed)} answer in a row below {self.confidence_threshold:.2f} "
                f"(confidence {confidence:.2f}): the visitor rephrased and the assistant still could not answer."
            )
        else:
            reason = f"The answer's confidence {confidence:.2f} is below {self.confidence_threshold:.2f}."
        return Escalation(session_id, Trigger.LOW_CONFIDENCE, reason, now_iso())

    @staticmethod
    def for_failure(session_id: str, reason: str = "Every AI provider failed.") -> Escalation:
        """No provider could answer."""
        return Escalation(session_id, Trigger.ERROR, reason, now_iso())

    @staticmethod
    def for_user_request(session_id: str, reason: str | None) -> Escalation:
        """The visitor asked for a person."""
        return Escalation(session_id, Trigger.USER_REQUEST, reason or "The visitor asked for a human.", now_iso())


def _ordinal(n: int) -> str:
    """'Second', 'Third', ... for the reasons agents read."""
    return {1: "First", 2: "Second", 3: "Third", 4: "Fourth", 5: "Fifth"}.get(n, f"{n}th")


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
