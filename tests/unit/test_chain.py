"""The provider chain and its stall watchdog, with scripted providers: failover, timeouts, breakers, cancellation.

The watchdog runs on the event loop's own timer, so a stalled provider here waits on an event that never comes
and the test sets first-token / idle timeouts of a few hundredths of a second: nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import pytest

from server.ai.chain import ChainDelta, ChainDone, ChainEvent, ChainFailed, ChainInterrupted, ProviderChain
from server.ai.providers.base import AIProvider, Finished, ProviderError, ProviderRequest, StreamEvent, TextDelta
from server.settings import FailoverSettings
from tests.fakes import FakeClock

REQUEST = ProviderRequest(system_prompt="Be brief.", history=(), message="Where is my order?")
SHORT = 0.05  # the watchdog's timeouts in these tests: long enough to never fire by accident, short to wait for


class Stall:
    """A step of a script: the provider goes quiet here (until the consumer cancels it)."""


class Scripted(AIProvider):
    """A provider that plays a script: text deltas, ProviderErrors, stalls, then (unless cut short) a Finished."""

    def __init__(self, name: str, *script: str | ProviderError | Stall, finish: Finished | None = None) -> None:
        self.name = name
        self.model = f"{name}-model"
        self.script = script
        self.finish = finish or Finished(confidence=0.9, input_tokens=10, output_tokens=3)
        self.calls = 0
        self.closed = 0

    @property
    def configured(self) -> bool:
        """Always callable."""
        return True

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
        """Play the script once per call."""
        self.calls += 1
        try:
            for step in self.script:
                if isinstance(step, ProviderError):
                    raise step
                if isinstance(step, Stall):
                    await asyncio.Event().wait()
                yield TextDelta(str(step))
            yield self.finish
        finally:
            self.closed += 1


class Unconfigured(Scripted):
    """A provider without a key: never called."""

    @property
    def configured(self) -> bool:
        """Never callable."""
        return False


def chain(
    providers: Sequence[AIProvider],
    clock: FakeClock | None = None,
    *,
    threshold: int = 1,
    cooldown: float = 30.0,
    first_token: float = 2.0,
    idle: float = 2.0,
) -> ProviderChain:
    """A chain over `providers` with the given breaker and watchdog settings."""
    return ProviderChain(
        providers,
        FailoverSettings(
            failure_threshold=threshold,
            cooldown=cooldown,
            request_timeout=30.0,
            first_token_timeout=first_token,
            idle_timeout=idle,
        ),
        clock=clock or FakeClock(),
    )


async def run(subject: ProviderChain, *, local_only: bool = False) -> list[ChainEvent]:
    """Every event of one answer."""
    return [event async for event in subject.stream(REQUEST, local_only=local_only)]


async def test_the_first_provider_answers_and_the_rest_are_not_called() -> None:
    first, second = Scripted("openai", "Hello", " there"), Scripted("gemini", "unused")
    events = await run(chain([first, second]))
    assert events[:2] == [ChainDelta("openai", "Hello", False), ChainDelta("openai", " there", False)]
    done = events[-1]
    assert isinstance(done, ChainDone)
    assert (done.provider, done.text, done.confidence, done.input_tokens, done.output_tokens) == (
        "openai",
        "Hello there",
        0.9,
        10,
        3,
    )
    assert done.attempts == (("openai", False),)
    assert second.calls == 0 and first.closed == 1


async def test_a_failure_before_the_first_token_fails_over_silently() -> None:
    events = await run(chain([Scripted("openai", ProviderError("HTTP 500")), Scripted("gemini", "Hi")]))
    assert [type(e) for e in events] == [ChainDelta, ChainDone]
    assert events[0] == ChainDelta("gemini", "Hi", False)
    assert isinstance(events[-1], ChainDone) and events[-1].attempts == (("openai", True), ("gemini", False))


async def test_a_failure_after_the_first_token_interrupts_and_the_next_provider_starts_over() -> None:
    events = await run(chain([Scripted("openai", "Half an ans", ProviderError("reset")), Scripted("gemini", "Whole")]))
    assert events == [
        ChainDelta("openai", "Half an ans", False),
        ChainInterrupted("openai", "reset"),
        ChainDelta("gemini", "Whole", True),  # `reset`: clients drop what openai wrote
        events[-1],
    ]
    assert isinstance(events[-1], ChainDone) and events[-1].text == "Whole"


async def test_when_every_provider_fails_the_outcome_keeps_the_partial_text_and_every_reason() -> None:
    events = await run(chain([Scripted("openai", "Par", ProviderError("reset")), Scripted("gemini", ProviderError("HTTP 503"))]))
    failed = events[-1]
    assert isinstance(failed, ChainFailed)
    assert failed.partial == "Par"
    assert failed.reasons == ("openai: reset", "gemini: HTTP 503")
    assert failed.attempts == (("openai", True), ("gemini", True))


async def test_a_stream_that_ends_without_finishing_is_a_failure() -> None:
    class Truncated(Scripted):
        async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent, None]:
            yield TextDelta("cut")

    events = await run(chain([Truncated("openai"), Scripted("gemini", "ok")]))
    assert ChainInterrupted("openai", "stream ended without an answer") in events
    assert isinstance(events[-1], ChainDone) and events[-1].provider == "gemini"


async def test_unconfigured_and_skipped_providers_are_never_called() -> None:
    missing, skipped, local = Unconfigured("openai"), Scripted("gemini"), Scripted("local", "From the base")
    subject = chain([missing, skipped, local])
    assert subject.usable_names == ["gemini", "local"]
    events = [event async for event in subject.stream(REQUEST, skip=("gemini",))]
    assert isinstance(events[-1], ChainDone) and events[-1].provider == "local"
    assert missing.calls == 0 and skipped.calls == 0


async def test_local_only_uses_the_knowledge_base_alone() -> None:
    paid, local = Scripted("openai", "paid"), Scripted("local", "free")
    events = await run(chain([paid, local]), local_only=True)
    assert isinstance(events[-1], ChainDone) and events[-1].provider == "local"
    assert paid.calls == 0


# --- the stall watchdog ----------------------------------------------------------------------------------


async def test_no_first_token_in_time_fails_over() -> None:
    stalled = Scripted("openai", Stall())
    events = await run(chain([stalled, Scripted("gemini", "Hi")], first_token=SHORT, idle=SHORT))
    assert [type(e) for e in events] == [ChainDelta, ChainDone]
    assert isinstance(events[-1], ChainDone) and events[-1].attempts == (("openai", True), ("gemini", False))
    assert stalled.closed == 1  # the abandoned stream was closed, not left running


async def test_a_stream_that_goes_quiet_after_its_first_token_counts_as_stalled() -> None:
    events = await run(chain([Scripted("openai", "Hel", Stall()), Scripted("gemini", "Hi")], first_token=SHORT, idle=SHORT))
    assert ChainInterrupted("openai", "stream stalled") in events
    assert isinstance(events[-1], ChainDone) and events[-1].provider == "gemini"


async def test_the_reasons_tell_a_missing_first_token_from_a_stall() -> None:
    events = await run(chain([Scripted("openai", Stall()), Scripted("gemini", "x", Stall())], first_token=SHORT, idle=SHORT))
    failed = events[-1]
    assert isinstance(failed, ChainFailed)
    assert failed.reasons == ("openai: no first token in time", "gemini: stream stalled")


async def test_time_the_consumer_spends_on_a_delta_does_not_count_against_the_provider() -> None:
    subject = chain([Scripted("openai", "a", "b")], first_token=SHORT, idle=SHORT)
    texts: list[str] = []
    async for event in subject.stream(REQUEST):
        if isinstance(event, ChainDelta):
            texts.append(event.text)
            await _hold(2 * SHORT)  # a slow consumer: two idle timeouts pass while it holds the delta
        last = event
    assert texts == ["a", "b"]
    assert isinstance(last, ChainDone) and last.provider == "openai"


async def _hold(seconds: float) -> None:
    """Keep the event loop's clock running for `seconds` without being the code under test's timer."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.Event().wait(), seconds)


async def test_a_cancellation_from_outside_is_not_taken_for_a_stall() -> None:
    stalled = Scripted("openai", "Hel", Stall())
    fallback = Scripted("gemini", "Hi")
    subject = chain([stalled, fallback], first_token=2.0, idle=2.0)
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for _ in subject.stream(REQUEST):
            first_delta.set()

    task = asyncio.create_task(consume())
    await first_delta.wait()
    task.cancel()  # stop-generation
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fallback.calls == 0 and stalled.closed == 1
    assert subject.breakers["openai"].state == "closed"  # a stop is not the provider's failure


# --- breakers inside the chain ---------------------------------------------------------------------------


async def test_a_failing_provider_is_skipped_while_its_circuit_is_open(clock: FakeClock) -> None:
    failing, good = Scripted("openai", ProviderError("HTTP 500")), Scripted("gemini", "ok")
    subject = chain([failing, good], clock, threshold=1, cooldown=30)
    await run(subject)
    assert subject.breakers["openai"].state == "open"
    events = await run(subject)
    assert failing.calls == 1 and good.calls == 2
    assert isinstance(events[-1], ChainDone) and events[-1].attempts == (("gemini", False),)
    clock.advance(30)  # half open: one trial call
    await run(subject)
    assert failing.calls == 2


async def test_retry_after_from_a_429_opens_the_circuit_for_that_long(clock: FakeClock) -> None:
    subject = chain([Scripted("openai", ProviderError("HTTP 429", retry_after=90)), Scripted("gemini", "ok")], clock, threshold=5)
    await run(subject)
    assert subject.breakers["openai"].open_until == clock.now + 90


async def test_when_every_circuit_is_open_the_earliest_is_probed_and_a_good_answer_closes_it(clock: FakeClock) -> None:
    flaky = Scripted("openai", ProviderError("down"))
    subject = chain([flaky], clock, threshold=1, cooldown=300)
    await run(subject)
    assert subject.breakers["openai"].state == "open"
    flaky.script = ("back",)  # it recovered before its cooldown ended
    events = await run(subject)  # panic mode: probed anyway
    assert isinstance(events[-1], ChainDone) and events[-1].provider == "openai"
    assert subject.breakers["openai"].state == "closed"


async def test_passive_calls_leave_every_breaker_alone_and_never_probe(clock: FakeClock) -> None:
    failing = Scripted("openai", ProviderError("HTTP 500"))
    subject = chain([failing, Scripted("gemini", "ok")], clock, threshold=1)
    outcome = await subject.complete(REQUEST, passive=True)
    assert isinstance(outcome, ChainDone) and outcome.provider == "gemini"
    assert subject.breakers["openai"].state == "closed"  # a background summary never opens a circuit

    await run(subject)  # a visitor's call does open it
    before = failing.calls
    outcome = await subject.complete(REQUEST, passive=True, skip=("gemini",))
    assert isinstance(outcome, ChainFailed) and outcome.reasons == ("openai: circuit open",)
    assert failing.calls == before and not subject.breakers["openai"].trial_running


async def test_passive_calls_make_no_paid_call_while_budgets_say_so() -> None:
    paid, local = Scripted("openai", "paid"), Scripted("local", "free")
    subject = chain([paid, local])
    subject.paid_paused = lambda: True
    outcome = await subject.complete(REQUEST, passive=True)
    assert isinstance(outcome, ChainDone) and outcome.provider == "local" and paid.calls == 0
