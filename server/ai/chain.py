"""Failover across providers in `AI_PROVIDERS` order, with a circuit breaker for each."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass

from loguru import logger

from server.ai.breaker import CircuitBreaker, claim_panic_probe
from server.ai.providers.base import AIProvider, ProviderError, ProviderRequest, TextDelta
from server.ai.retrieval import Source
from server.settings import FailoverSettings


@dataclass(slots=True)  # not frozen: one is made per token
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
    attempts: tuple[tuple[str, bool], ...] = ()
    sources: tuple[Source, ...] = ()  # the entries the provider says it answered from (Finished.sources)


@dataclass(frozen=True, slots=True)
class ChainFailed:
    """No provider could answer; `partial` is what the last interrupted one wrote."""

    partial: str
    reasons: tuple[str, ...]
    attempts: tuple[tuple[str, bool], ...] = ()


ChainEvent = ChainDelta | ChainInterrupted | ChainDone | ChainFailed
LOCAL_PROVIDER = "local"  # the knowledge base: free, offline, what a spent token budget still allows


class _StallWatchdog:
    """The first-token and idle timeouts of one attempt, with one timer instead of one per token.

    Only time spent waiting on the provider counts (not the time the consumer spends publishing a delta), as
    with an asyncio.timeout paused around each yield, which cost a timer reschedule or two per token (a tenth
    of the CPU with 100 streams in profiles). A firing watchdog cancels the waiting task; `expired` tells that
    cancellation apart from any other (stop-generation, shutdown), which still wins.
    """

    def __init__(self, first_token_timeout: float, idle_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._first_token_timeout = first_token_timeout
        self._idle_timeout = idle_timeout
        self._timeout = first_token_timeout
        self._waiting_since: float | None = None
        self._fired = False
        self._answered = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self._loop.time() + self._timeout, self._check)

    def waiting(self) -> None:
        """The task is about to wait for the provider's next event."""
        self._waiting_since = self._loop.time()

    def received(self) -> None:
        """An event arrived; the idle timeout applies from now on."""
        self._waiting_since = None
        if not self._answered:
            self._answered = True
            self._timeout = self._idle_timeout
            if self._idle_timeout < self._first_token_timeout:
                self._arm(self._loop.time() + self._idle_timeout)

    def expired(self) -> bool:
        """Whether the cancellation being handled is ours; if so it is taken back."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def stop(self) -> None:
        """The attempt is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._waiting_since is None:  # the consumer has the event: look again one timeout from now
            self._arm(now + self._timeout)
            return
        deadline = self._waiting_since + self._timeout
        if now < deadline:
            self._arm(deadline)
            return
        if self._task is not None:
            self._fired = True
            self._task.cancel()


AttemptRecorder = Callable[[str, bool, float], None]
"""Told of every provider attempt (name, failed, seconds); the attempts also travel with the outcome."""


class ProviderChain:
    """Tries each usable provider once, at once, in order: failover is the retry."""

    def __init__(
        self,
        providers: Sequence[AIProvider],
        settings: FailoverSettings,
        *,
        record_attempt: AttemptRecorder | None = None,
        on_first_token: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.providers = list(providers)
        self.breakers = {p.name: CircuitBreaker(settings.failure_threshold, settings.cooldown, clock) for p in self.providers}
        self._first_token_timeout = min(settings.first_token_timeout, settings.request_timeout)
        self._idle_timeout = settings.idle_timeout
        self._record_attempt = record_attempt
        self._on_first_token = on_first_token
        # Set by the token budgets: while it says so, background (passive) calls make no paid call either.
        self.paid_paused: Callable[[], bool] = lambda: False

    @property
    def usable_names(self) -> list[str]:
        """Providers that are configured, in failover order."""
        return [p.name for p in self.providers if p.configured]

    @property
    def paid_names(self) -> tuple[str, ...]:
        """Every provider but the local knowledge base (those a spent token budget rules out)."""
        return tuple(p.name for p in self.providers if p.name != LOCAL_PROVIDER)

    def _to_try(self, skip: tuple[str, ...], passive: bool, reasons: list[str]) -> Iterator[AIProvider]:
        """The providers to call, in order, each checked with its breaker just before its turn.

        When every breaker refuses, the one whose open period ends first is probed anyway (panic mode), so a
        provider that came back answers at once instead of after its cooldown. Passive callers never probe.
        """
        candidates = [p for p in self.providers if p.configured and p.name not in skip]
        tried = False
        for provider in candidates:
            breaker = self.breakers[provider.name]
            if not (breaker.state == "closed" if passive else breaker.allow()):
                reasons.append(f"{provider.name}: circuit {breaker.state}")
                continue
            tried = True
            yield provider
        if tried or passive:
            return
        probe = claim_panic_probe([(p, self.breakers[p.name]) for p in candidates])
        if probe is None:  # every circuit already has a trial in flight: fail fast rather than pile on
            return
        logger.warning("every provider's circuit is open: probing {} before its cooldown ends", probe.name)
        yield probe

    async def stream(
        self,
        request: ProviderRequest,
        skip: tuple[str, ...] = (),
        *,
        passive: bool = False,
        local_only: bool = False,
    ) -> AsyncGenerator[ChainEvent, None]:
        """Yield the answer as it is written, failing over before or after the first delta.

        `passive` calls (background summaries) use only providers whose circuit is closed and leave every
        breaker as it was: they never count a failure, close a circuit, take a half-open trial or probe.
        `local_only` calls (a token budget is spent) use the local knowledge base alone: no paid call.
        """
        if local_only or (passive and self.paid_paused()):
            skip = (*skip, *self.paid_names)
        reasons: list[str] = []
        attempts: list[tuple[str, bool]] = []
        partial = ""
        written_before = False
        for provider in self._to_try(skip, passive, reasons):
            breaker = self.breakers[provider.name]
            # Read at once (no await since the breaker said yes): whether this call holds the trial slot, that is
            # it is a half-open trial or a panic probe rather than a call that found the circuit closed.
            trial = not passive and breaker.trial_running
            started = time.perf_counter()
            parts: list[str] = []
            # The provider's stream is read here directly (no generator in between: this runs once per token),
            # under the first-token and idle timeouts.
            events = provider.stream(request)
            watchdog = _StallWatchdog(self._first_token_timeout, self._idle_timeout)
            try:
                async with contextlib.aclosing(events):
                    while True:
                        watchdog.waiting()
                        try:
                            event = await anext(events)
                        except StopAsyncIteration:
                            raise ProviderError("stream ended without an answer") from None
                        except asyncio.CancelledError:
                            if watchdog.expired():
                                raise ProviderError("stream stalled" if parts else "no first token in time") from None
                            raise
                        watchdog.received()
                        if isinstance(event, TextDelta):
                            if not parts and self._on_first_token is not None:
                                self._on_first_token(provider.name, time.perf_counter() - started)
                            yield ChainDelta(provider.name, event.text, written_before and not parts)
                            parts.append(event.text)
                            continue
                        if not passive:
                            breaker.record_success(trial)
                        self._record(attempts, provider.name, False, started)
                        yield ChainDone(
                            provider.name,
                            "".join(parts),
                            event.confidence,
                            event.input_tokens,
                            event.output_tokens,
                            tuple(attempts),
                            event.sources,
                        )
                        return
            except ProviderError as err:
                if not passive:
                    breaker.record_failure(err.retry_after, trial)
                self._record(attempts, provider.name, True, started)
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
                if trial:  # only the holder frees the slot: another call's probe may be in flight
                    breaker.release_trial()
                raise
            finally:
                watchdog.stop()
        yield ChainFailed(partial, tuple(reasons), tuple(attempts))

    async def complete(
        self, request: ProviderRequest, skip: tuple[str, ...] = (), *, passive: bool = False
    ) -> ChainDone | ChainFailed:
        """The whole answer without streaming it anywhere (for summaries)."""
        async with contextlib.aclosing(self.stream(request, skip, passive=passive)) as events:
            async for event in events:
                if isinstance(event, ChainDone | ChainFailed):
                    return event
        raise RuntimeError("provider chain ended without an outcome")

    def _record(self, attempts: list[tuple[str, bool]], name: str, failed: bool, started: float) -> None:
        attempts.append((name, failed))
        if self._record_attempt is None:
            return
        try:
            self._record_attempt(name, failed, time.perf_counter() - started)
        except Exception as err:  # metrics must never cost a reply
            logger.warning("could not record a provider attempt: {}", type(err).__name__)
