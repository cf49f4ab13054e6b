"""Failover across providers in `AI_PROVIDERS` order, with a circuit breaker for each."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from loguru import logger

from server.breaker import CircuitBreaker
from server.providers.base import AIProvider, Finished, ProviderError, ProviderRequest, TextDelta


@dataclass(frozen=True, slots=True)
class ChainDelta:
    """Text from the provider now answering; `reset` drops what an interrupted provider wrote."""

    provider: str
    text: str
    reset: bool


@dataclass(frozen=True, slots=True)
class ChainInterrupted:
    """A provider failed after it had started writing; another one starts over."""

    provider: str
    reason: str


@dataclass(frozen=True, slots=True)
class ChainDone:
    """A complete answer."""

    provider: str
    text: str
    confidence: float | None
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ChainFailed:
    """No provider could answer; `partial` is what the last interrupted one wrote."""

    partial: str
    reasons: tuple[str, ...]


ChainEvent = ChainDelta | ChainInterrupted | ChainDone | ChainFailed
AttemptRecorder = Callable[[str, bool, float], Awaitable[None]]


class ProviderChain:
    """Tries each usable provider once, at once, in order: failover is the retry."""

    def __init__(
        self,
        providers: Sequence[AIProvider],
        *,
        failure_threshold: int,
        cooldown: float,
        request_timeout: float,
        first_token_timeout: float,
        idle_timeout: float,
        record_attempt: AttemptRecorder | None = None,
        on_first_token: Callable[[str, float], None] | None = None,
    ) -> None:
        self.providers = list(providers)
        self.breakers = {p.name: CircuitBreaker(failure_threshold, cooldown) for p in self.providers}
        self._first_token_timeout = min(first_token_timeout, request_timeout)
        self._idle_timeout = idle_timeout
        self._record_attempt = record_attempt
        self._on_first_token = on_first_token

    @property
    def usable_names(self) -> list[str]:
        """Providers that are configured, in failover order."""
        return [p.name for p in self.providers if p.configured]

    async def stream(self, request: ProviderRequest, skip: tuple[str, ...] = ()) -> AsyncIterator[ChainEvent]:
        """Yield the answer as it is written, failing over before or after the first delta."""
        reasons: list[str] = []
        partial = ""
        written_before = False
        for provider in self.providers:
            if not provider.configured or provider.name in skip:
                continue
            breaker = self.breakers[provider.name]
            if not breaker.allow():
                reasons.append(f"{provider.name}: circuit open")
                continue
            started = time.perf_counter()
            parts: list[str] = []
            try:
                async with contextlib.aclosing(self._attempt(provider, request)) as attempt:
                    async for event in attempt:
                        if isinstance(event, TextDelta):
                            if not parts and self._on_first_token is not None:
                                self._on_first_token(provider.name, time.perf_counter() - started)
                            yield ChainDelta(provider.name, event.text, reset=written_before and not parts)
                            parts.append(event.text)
                            continue
                        breaker.record_success()
                        await self._record(provider.name, False, started)
                        yield ChainDone(
                            provider.name, "".join(parts), event.confidence, event.input_tokens, event.output_tokens
                        )
                        return
            except ProviderError as err:
                breaker.record_failure(err.retry_after)
                await self._record(provider.name, True, started)
                reasons.append(f"{provider.name}: {err.reason}")
                logger.warning(
                    "provider {} failed after {:.0f} ms: {} (circuit {})",
                    provider.name,
                    (time.perf_counter() - started) * 1000,
                    err.reason,
                    breaker.state,
                )
                if parts:
                    written_before = True
                    partial = "".join(parts)
                    yield ChainInterrupted(provider.name, err.reason)
            except BaseException:
                breaker.release_trial()
                raise
        yield ChainFailed(partial, tuple(reasons))

    async def complete(self, request: ProviderRequest, skip: tuple[str, ...] = ()) -> ChainDone | None:
        """The whole answer without streaming it anywhere (for summaries); None when nobody answered."""
        async with contextlib.aclosing(self.stream(request, skip)) as events:
            async for event in events:
                if isinstance(event, ChainDone):
                    return event
        return None

    async def _attempt(self, provider: AIProvider, request: ProviderRequest) -> AsyncIterator[TextDelta | Finished]:
        """One provider's stream with the first-token and idle timeouts; closes its HTTP stream on any exit."""
        stream = provider.stream(request)
        async with contextlib.aclosing(stream):
            first = True
            while True:
                timeout = self._first_token_timeout if first else self._idle_timeout
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that lands
                    # as the next delta arrives, and stop-generation must always win.
                    async with asyncio.timeout(timeout):
                        event = await anext(stream)
                except StopAsyncIteration:
                    raise ProviderError("stream ended without an answer") from None
                except TimeoutError:
                    raise ProviderError("no first token in time" if first else "stream stalled") from None
                first = False
                yield event
                if isinstance(event, Finished):
                    return

    async def _record(self, name: str, failed: bool, started: float) -> None:
        if self._record_attempt is None:
            return
        try:
            await self._record_attempt(name, failed, time.perf_counter() - started)
        except Exception as err:  # counters must never cost a reply
            logger.warning("could not record provider usage: {}", type(err).__name__)
