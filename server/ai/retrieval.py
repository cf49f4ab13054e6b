"""What one user message retrieved from the knowledge base: done once per message, read by the prompt, the offline
provider, the message's sources and the escalation rules alike."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from server.ai.knowledge import KnowledgeEntry
from server.contract import MessageSource


class Verdict(StrEnum):
    """What the retrieval says the message is, for the knowledge base."""

    ANSWER = "answer"  # the best entry answers it (calibrated confidence at or above the answer threshold)
    UNSURE = "unsure"  # in scope, but no entry is good enough: say so and suggest the closest entries
    OFF_TOPIC = "off_topic"  # nothing the store's support covers: a short scope answer, never an escalation
    SMALL_TALK = "small_talk"  # a greeting or a thank-you with no question in it


@dataclass(frozen=True, slots=True)
class Source:
    """A knowledge-base entry an answer used, as clients see it on the message (`sources: [{id, title}]`)."""

    id: str
    title: str

    def to_dict(self) -> MessageSource:
        """As clients receive it."""
        return {"id": self.id, "title": self.title}

    @classmethod
    def of(cls, entry: KnowledgeEntry) -> Source:
        """An entry as a source: its question is its title."""
        return cls(entry.id, entry.question)


@dataclass(frozen=True, slots=True)
class RankedEntry:
    """An entry with its calibrated confidence (0..1) that it answers the message."""

    entry: KnowledgeEntry
    confidence: float


@dataclass(frozen=True, slots=True)
class Retrieval:
    """The knowledge a message retrieved, best first, and what the retriever concluded about it."""

    matches: tuple[RankedEntry, ...]
    verdict: Verdict

    @property
    def confidence(self) -> float:
        """The best entry's calibrated confidence, 0 when nothing matched."""
        return self.matches[0].confidence if self.matches else 0.0


NOTHING = Retrieval((), Verdict.OFF_TOPIC)


class Retriever(Protocol):
    """Finds the entries for one message; cheap enough to run for every message (results cached per question)."""

    generation: int  # bumped when the entries change: whatever was derived from earlier retrievals is stale

    async def retrieve(self, message: str, limit: int = 3) -> Retrieval:
        """The best `limit` entries for a message and the verdict; never raises on odd input.

        Async because an embedding may come from a remote model (OpenAI's); the offline path awaits nothing.
        """
        ...
