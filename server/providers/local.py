"""The offline provider: answers from the knowledge base with no key and no network."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from server.knowledge import KnowledgeBase, terms
from server.providers.base import AIProvider, Finished, ProviderRequest, StreamEvent, TextDelta

NO_MATCH = (
    "I'm sorry, I couldn't find an answer to that in our help center. I can connect you with a member of "
    "our support team — just say \"talk to a human\" or press the button."
)
GREETING = "Hello! I'm the store's virtual assistant. How can I help you today — an order, shipping, a return?"
_GREETING_WORDS = frozenset("hi hello hey hiya howdy morning evening afternoon good there thanks thank you".split())


class LocalProvider(AIProvider):
    """Answers from the shipped knowledge base with no key and no network."""

    name = "local"
    model = "knowledge-base"

    def __init__(self, knowledge: KnowledgeBase, *, min_score: float = 0.35, chunk_chars: int = 24) -> None:
        self.knowledge = knowledge
        self.min_score = min_score
        self.chunk_chars = chunk_chars

    @property
    def configured(self) -> bool:
        return True

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamEvent]:
        words = re.findall(r"\w+", request.message.lower())
        if words and all(w in _GREETING_WORDS for w in words) and not terms(request.message):
            text, confidence = GREETING, 1.0
        else:
            matches = self.knowledge.search(request.message, limit=2)
            if matches and matches[0].score >= self.min_score:
                text, confidence = matches[0].entry.answer, matches[0].score
            else:
                text, confidence = NO_MATCH, matches[0].score if matches else 0.0
        for piece in _pieces(text, self.chunk_chars):
            yield TextDelta(piece)
        yield Finished(confidence=round(confidence, 3))


def _pieces(text: str, size: int) -> list[str]:
    """Word-boundary pieces whose concatenation is the text."""
    pieces: list[str] = []
    current = ""
    for token in re.findall(r"\S+\s*|\s+", text):
        if current and len(current) + len(token) > size:
            pieces.append(current)
            current = ""
        current += token
    if current:
        pieces.append(current)
    return pieces
