"""The offline provider: answers from the shipped knowledge base with no key and no network."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from loguru import logger

from server.ai.knowledge import KnowledgeBase, KnowledgeMatch, terms
from server.ai.providers.base import AIProvider, Finished, ProviderRequest, StreamEvent, TextDelta

NO_MATCH = (
    "I'm sorry, I couldn't find an answer to that in our help center. I can connect you with a member of our "
    "support team — just say 'talk to a human' or press the button."
)
GREETING = (
    "Hello! I'm the virtual assistant. How can I help you today? I can answer questions about orders, "
    "shipping, returns, refunds, payments and your account."
)
THANKS = "You're welcome! Is there anything else I can help you with?"
# A second entry is suggested only when it scores this well and nearly as well as the best one.
RELATED_MIN_SCORE = 0.6
RELATED_MAX_GAP = 0.1

_WORD = re.compile(r"[^\W_]+")
_GREETINGS = frozenset("hi hello hey hiya howdy yo greetings morning afternoon evening good day".split())
_THANKS = frozenset("thanks thank thx ty cheers appreciated appreciate great perfect awesome".split())
# Words that may stand next to a greeting or a thank-you without making the message a question.
_SMALL_TALK = _GREETINGS | _THANKS | frozenset("team everyone folks all much lot bot assistant".split())


class LocalProvider(AIProvider):
    """Answers from the shipped knowledge base with no key and no network."""

    name = "local"
    model = "knowledge-base"

    def __init__(self, knowledge: KnowledgeBase, *, min_score: float = 0.35, chunk_chars: int = 24) -> None:
        self.knowledge = knowledge
        self.min_score = min_score
        self.chunk_chars = max(1, chunk_chars)

    @property
    def configured(self) -> bool:
        """Always usable: it needs neither a key nor the network."""
        return True

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream the best entry's answer (or a greeting, or an offer of a human) in word-boundary pieces."""
        try:
            text, confidence = self.answer(request.message)
        except Exception as err:  # the offline provider is the last resort: it must always say something
            logger.warning("local provider could not search the knowledge base: {}", type(err).__name__)
            text, confidence = NO_MATCH, 0.0
        for piece in split_words(text, self.chunk_chars):
            yield TextDelta(piece)
            await asyncio.sleep(0)
        yield Finished(confidence=round(confidence, 3), input_tokens=0, output_tokens=0)

    def answer(self, message: str) -> tuple[str, float]:
        """The full reply to one message and its confidence."""
        small_talk = _small_talk(message)
        if small_talk is not None:
            return small_talk, 1.0
        matches = self.knowledge.search(message, limit=2)
        if not matches or matches[0].score < self.min_score:
            return NO_MATCH, matches[0].score if matches else 0.0
        best = matches[0]
        return best.entry.answer + _related(best, matches[1:]), best.score


def _small_talk(message: str) -> str | None:
    """A greeting or a thank-you with no question in it gets a friendly reply rather than a search."""
    words = [w.casefold() for w in _WORD.findall(message)]
    if not words or any(w not in _SMALL_TALK for w in terms(message)):
        return None
    if any(w in _THANKS for w in words):
        return THANKS
    if any(w in _GREETINGS for w in words):
        return GREETING
    return None


def _related(best: KnowledgeMatch, others: list[KnowledgeMatch]) -> str:
    """A "You might also ask" line when a second entry fits the message almost as well."""
    for match in others:
        if match.entry.id != best.entry.id and match.score >= max(RELATED_MIN_SCORE, best.score - RELATED_MAX_GAP):
            return f"\n\nYou might also ask: {match.entry.question}"
    return ""


def split_words(text: str, size: int) -> list[str]:
    """Pieces of about `size` characters, cut only at word boundaries; their concatenation is the text."""
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
