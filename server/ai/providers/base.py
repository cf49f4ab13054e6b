"""The one small async interface every AI provider implements."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal

from server.ai.retrieval import Retrieval, Source


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One earlier message of the conversation as the model sees it."""

    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """Everything a provider needs to answer one user message."""

    system_prompt: str
    history: Sequence[ChatTurn]
    message: str
    max_tokens: int | None = None
    retrieval: Retrieval | None = None  # what the message retrieved (the system prompt already shows it to models)


@dataclass(slots=True)  # not frozen: one is made per token, and a frozen dataclass's __init__ is several times slower
class TextDelta:
    """A piece of the answer as the provider streams it."""

    text: str
    logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    """The provider's proper end of an answer, with its confidence signal and usage."""

    confidence: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    sources: tuple[Source, ...] = ()  # the entries the answer used, when the provider knows (the offline one does)


StreamEvent = TextDelta | Finished


class ProviderError(Exception):
    """A failed provider call; the chain moves on to the next provider."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class AIProvider(ABC):
    """A source of answers; the chat service chains them for failover."""

    name: str
    model: str

    @property
    @abstractmethod
    def configured(self) -> bool:
        """Whether the provider can be called at all (for instance, it has a key)."""

    @abstractmethod
    def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yield text deltas, then exactly one Finished; raise ProviderError on any failure."""

    def warm_up(self) -> None:
        """Do at startup what the first call would otherwise do (no network), so the first visitor does not wait."""

    async def aclose(self) -> None:
        """Release network clients; providers without any keep the default."""


# A log-probability is at most 0; a little above it is float noise, anything more a malformed answer.
_LOGPROB_SLACK = 1e-3
# More tokens than any model reads or writes in one call: a count above it is a malformed answer.
MAX_TOKEN_COUNT = 10_000_000


def confidence_from_logprobs(logprobs: Sequence[float]) -> float | None:
    """exp(mean token logprob), the contract's confidence; None when there is no signal.

    A logprob that is not a finite number at most 0 makes the answer malformed: ProviderError, so the chain
    fails over instead of an OverflowError escaping the provider.
    """
    if not logprobs:
        return None
    try:
        values = [float(value) for value in logprobs]
    except (TypeError, ValueError):
        raise ProviderError("malformed answer: logprob is not a number") from None
    if not all(math.isfinite(value) and value <= _LOGPROB_SLACK for value in values):
        raise ProviderError("malformed answer: logprob out of range")
    return min(1.0, max(0.0, math.exp(min(0.0, sum(values) / len(values)))))


def token_count(value: object) -> int:
    """A usage figure from a provider's answer as a whole number; anything else is that provider's failure."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProviderError("malformed answer: token count is not a number")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ProviderError("malformed answer: token count is not a whole number")
    if not 0 <= value <= MAX_TOKEN_COUNT:
        raise ProviderError("malformed answer: token count out of range")
    return int(value)
