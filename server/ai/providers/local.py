"""The offline provider: answers from the shipped knowledge base with no key and no network."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from loguru import logger

from server.ai.hybrid import offline_retriever, small_talk
from server.ai.knowledge import KnowledgeBase
from server.ai.providers.base import AIProvider, Finished, ProviderRequest, StreamEvent, TextDelta
from server.ai.retrieval import Retrieval, Retriever, Source, Verdict

SCOPE_ANSWER = (
    "I'm the store's support assistant, so I can't help with that one. I can help with orders, shipping, returns, "
    "refunds, payments and your account. What can I do for you?"
)
NO_MATCH = (
    "I'm sorry, I couldn't find an answer to that in our help center. I can connect you with a member of our "
    "support team — just say 'talk to a human' or press the button."
)
UNSURE_OFFER = "If not, I can connect you with a member of our support team — just say 'talk to a human'."
GREETING = (
    "Hello! I'm the virtual assistant. How can I help you today? I can answer questions about orders, "
    "shipping, returns, refunds, payments and your account."
)
THANKS = "You're welcome! Is there anything else I can help you with?"


class LocalProvider(AIProvider):
    """Answers from the message's retrieval (the knowledge base) with no key and no network."""

    name = "local"
    model = "knowledge-base"

    def __init__(self, retriever: Retriever | KnowledgeBase, *, chunk_chars: int = 24) -> None:
        if isinstance(retriever, KnowledgeBase):
            retriever = offline_retriever(retriever)
        self.retriever: Retriever = retriever
        self.chunk_chars = max(1, chunk_chars)

    @property
    def configured(self) -> bool:
        """Always usable: it needs neither a key nor the network."""
        return True

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream the reply the retrieval calls for, in word-boundary pieces, then its confidence and sources."""
        try:
            retrieval = request.retrieval or await self.retriever.retrieve(request.message)
            text, confidence, sources = reply(request.message, retrieval)
        except Exception as err:  # the offline provider is the last resort: it must always say something
            logger.warning("local provider could not search the knowledge base: {}", type(err).__name__)
            text, confidence, sources = NO_MATCH, 0.0, ()
        for piece in split_words(text, self.chunk_chars):
            yield TextDelta(piece)
            await asyncio.sleep(0)
        yield Finished(confidence=round(confidence, 3), input_tokens=0, output_tokens=0, sources=sources)

    async def answer(self, message: str) -> tuple[str, float]:
        """The full reply to one message and its confidence (retrieving it here)."""
        text, confidence, _ = reply(message, await self.retriever.retrieve(message))
        return text, confidence


def reply(message: str, retrieval: Retrieval) -> tuple[str, float, tuple[Source, ...]]:
    """The offline reply a retrieval calls for: its text, confidence and the entries it used."""
    verdict = retrieval.verdict
    if verdict == Verdict.SMALL_TALK:
        return (THANKS if small_talk(message) == "thanks" else GREETING), 1.0, ()
    if verdict == Verdict.OFF_TOPIC:
        return SCOPE_ANSWER, retrieval.confidence, ()
    matches = retrieval.matches
    if verdict == Verdict.ANSWER and matches:
        best = matches[0]
        text, sources = best.entry.answer, [Source.of(best.entry)]
        related = next((m for m in matches[1:] if m.confidence >= 0.5 and m.entry.id != best.entry.id), None)
        if related is not None:  # a second entry fits confidently too: point at it
            text += f"\n\nYou might also ask: {related.entry.question}"
            sources.append(Source.of(related.entry))
        return text, best.confidence, tuple(sources)
    suggestions = list(dict.fromkeys(m.entry.question for m in matches))[:2]
    if not suggestions:
        return NO_MATCH, retrieval.confidence, ()
    quoted = " or ".join(f"“{q}”" for q in suggestions)
    return f"I'm not sure I understood. Did you mean: {quoted}? {UNSURE_OFFER}", retrieval.confidence, ()


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
