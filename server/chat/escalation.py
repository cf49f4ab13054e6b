"""Escalation rules in one place: when a conversation needs a person, and why."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from server.storage.sessions import now_iso

TRIGGERS = ("keyword", "low_confidence", "error", "user_request")


@dataclass(frozen=True, slots=True)
class Escalation:
    """The contract's Escalation object."""

    session_id: str
    trigger: str
    reason: str
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """As clients receive it."""
        return {"sessionId": self.session_id, "trigger": self.trigger, "reason": self.reason, "createdAt": self.created_at}


class EscalationRules:
    """Decides the four contract triggers; the chat service only asks."""

    def __init__(self, keywords: tuple[str, ...], confidence_threshold: float) -> None:
        self.confidence_threshold = confidence_threshold
        self._keywords = [
            (keyword, re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, keyword.split())) + r"(?!\w)", re.IGNORECASE))
            for keyword in keywords
            if keyword.strip()
        ]

    def keyword_in(self, text: str) -> str | None:
        """The first escalation keyword found as a whole word, in any case."""
        for keyword, pattern in self._keywords:
            if pattern.search(text):
                return keyword
        return None

    def for_user_message(self, session_id: str, text: str) -> Escalation | None:
        """A keyword in what the visitor wrote."""
        keyword = self.keyword_in(text)
        if keyword is None:
            return None
        return Escalation(session_id, "keyword", f"The message mentions “{keyword}”.", now_iso())

    def for_reply(self, session_id: str, confidence: float | None) -> Escalation | None:
        """A reply the model itself was unsure of; no signal (None) never counts as low."""
        if confidence is None or confidence >= self.confidence_threshold:
            return None
        return Escalation(
            session_id,
            "low_confidence",
            f"The answer's confidence {confidence:.2f} is below {self.confidence_threshold:.2f}.",
            now_iso(),
        )

    @staticmethod
    def for_failure(session_id: str, reason: str = "Every AI provider failed.") -> Escalation:
        """No provider could answer."""
        return Escalation(session_id, "error", reason, now_iso())

    @staticmethod
    def for_user_request(session_id: str, reason: str | None) -> Escalation:
        """The visitor asked for a person."""
        return Escalation(session_id, "user_request", reason or "The visitor asked for a human.", now_iso())
