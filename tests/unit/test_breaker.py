"""The circuit breaker and the choice of panic probe, on a fake clock (no sleeping)."""

from __future__ import annotations

from server.ai.breaker import CircuitBreaker, claim_panic_probe
from tests.fakes import FakeClock


def opened(clock: FakeClock, cooldown: float = 300.0) -> CircuitBreaker:
    """A breaker with threshold 1 that one failure just opened."""
    breaker = CircuitBreaker(1, cooldown, clock)
    breaker.record_failure()
    assert breaker.state == "open"
    return breaker


def test_the_probe_goes_to_the_circuit_whose_open_period_ends_first() -> None:
    clock = FakeClock()
    openai = opened(clock)
    clock.advance(5)
    gemini = opened(clock, cooldown=100)  # opened later, but its shorter cooldown ends first
    assert claim_panic_probe([("openai", openai), ("gemini", gemini)]) == "gemini"
    assert gemini.trial_running and not openai.trial_running
    assert gemini.state == "open"  # health keeps the true state while the probe is in flight


def test_ties_go_to_the_ai_providers_order() -> None:
    clock = FakeClock()
    first, second = opened(clock), opened(clock)
    assert claim_panic_probe([("gemini", second), ("openai", first)]) == "gemini"


def test_a_retry_after_counts_as_an_open_period() -> None:
    clock = FakeClock()
    openai = opened(clock, cooldown=30)
    gemini = CircuitBreaker(5, 30, clock)
    gemini.record_failure(retry_after=10)  # a 429 opens it below the threshold, for less than the cooldown
    assert gemini.state == "open"
    assert claim_panic_probe([("openai", openai), ("gemini", gemini)]) == "gemini"


def test_at_most_one_probe_in_flight_per_provider() -> None:
    clock = FakeClock()
    openai, gemini = opened(clock), opened(clock)
    candidates = [("openai", openai), ("gemini", gemini)]
    assert claim_panic_probe(candidates) == "openai"
    assert claim_panic_probe(candidates) == "gemini"  # openai is being probed: the next one, not a second call
    assert claim_panic_probe(candidates) is None  # both being probed: fail fast
    openai.release_trial()  # the probe was cancelled without a verdict
    assert claim_panic_probe(candidates) == "openai"


def test_a_half_open_trial_in_flight_also_blocks_a_probe() -> None:
    clock = FakeClock()
    breaker = opened(clock, cooldown=30)
    clock.advance(31)
    assert breaker.state == "half_open" and breaker.allow()
    assert not breaker.allow()
    assert claim_panic_probe([("openai", breaker)]) is None


def test_closed_circuits_are_never_probed() -> None:
    clock = FakeClock()
    closed = CircuitBreaker(3, 30, clock)
    assert claim_panic_probe([("openai", closed)]) is None
    assert not closed.trial_running
    assert claim_panic_probe([]) is None


def test_a_successful_probe_closes_and_a_failed_one_reopens_for_a_full_cooldown() -> None:
    clock = FakeClock()
    breaker = opened(clock, cooldown=300)
    clock.advance(100)
    assert claim_panic_probe([("openai", breaker)]) == "openai"
    breaker.record_failure(trial=True)
    assert breaker.state == "open" and not breaker.trial_running
    assert breaker.open_until == clock.now + 300

    assert claim_panic_probe([("openai", breaker)]) == "openai"
    breaker.record_success(trial=True)
    assert breaker.state == "closed" and breaker.open_until is None and not breaker.trial_running


def test_a_call_begun_while_closed_does_not_free_the_probe_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 300, clock)
    assert breaker.allow()  # a slow call starts while the circuit is closed
    breaker.record_failure()  # another call opens the circuit
    assert claim_panic_probe([("openai", breaker)]) == "openai"
    breaker.record_failure()  # the slow call fails: it never held the slot
    assert breaker.trial_running
    assert claim_panic_probe([("openai", breaker)]) is None
    breaker.record_success()  # a closed-era call's success closes the circuit, the probe still holds the slot
    assert breaker.state == "closed" and breaker.trial_running
    breaker.record_failure(trial=True)  # the probe's own verdict frees the slot
    assert not breaker.trial_running and breaker.state == "open"


# --- the breaker's own life cycle ------------------------------------------------------------------------


def test_opens_only_after_threshold_failures_in_a_row(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 30, clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.open_until == clock.now + 30


def test_a_success_resets_the_count_of_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 30, clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_a_threshold_below_one_counts_as_one(clock: FakeClock) -> None:
    breaker = CircuitBreaker(0, 30, clock)
    breaker.record_failure()
    assert breaker.state == "open"


def test_half_open_after_the_cooldown_lets_exactly_one_trial_through(clock: FakeClock) -> None:
    breaker = opened(clock, cooldown=30)
    clock.advance(29.9)
    assert breaker.state == "open" and not breaker.allow()
    clock.advance(0.1)
    assert breaker.state == "half_open"
    assert breaker.allow() and breaker.trial_running
    assert not breaker.allow()  # a second caller waits for the trial's verdict


def test_a_successful_trial_closes_the_circuit(clock: FakeClock) -> None:
    breaker = opened(clock, cooldown=30)
    clock.advance(30)
    assert breaker.allow()
    breaker.record_success(trial=True)
    assert breaker.state == "closed" and not breaker.trial_running and breaker.allow()


def test_a_failed_trial_reopens_for_a_full_cooldown_whatever_the_threshold(clock: FakeClock) -> None:
    breaker = CircuitBreaker(5, 30, clock)
    for _ in range(5):
        breaker.record_failure()
    clock.advance(30)
    assert breaker.allow()
    breaker.record_failure(trial=True)
    assert breaker.state == "open" and breaker.open_until == clock.now + 30 and not breaker.trial_running


def test_a_cancelled_trial_frees_the_slot_for_the_next_caller(clock: FakeClock) -> None:
    breaker = opened(clock, cooldown=30)
    clock.advance(30)
    assert breaker.allow()
    breaker.release_trial()
    assert breaker.state == "half_open" and breaker.allow()


def test_retry_after_opens_below_the_threshold_and_never_shortens_an_open_period(clock: FakeClock) -> None:
    breaker = CircuitBreaker(5, 30, clock)
    breaker.record_failure(retry_after=120)
    assert breaker.state == "open" and breaker.open_until == clock.now + 120
    breaker.record_failure(retry_after=5)  # a shorter hint later does not cut the wait short
    assert breaker.open_until == clock.now + 120
    clock.advance(120)
    assert breaker.state == "half_open"


def test_a_zero_retry_after_is_an_ordinary_failure(clock: FakeClock) -> None:
    breaker = CircuitBreaker(2, 30, clock)
    breaker.record_failure(retry_after=0)
    assert breaker.state == "closed"
    breaker.record_failure(retry_after=0)
    assert breaker.state == "open" and breaker.open_until == clock.now + 30
