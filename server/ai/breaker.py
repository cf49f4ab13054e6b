"""Per-provider circuit breaker: skip a failing provider for a while, then try it once."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class CircuitBreaker:
    """Closed → open after N failures in a row (or a 429's Retry-After) → half open after the cooldown."""

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._trial_running = False

    @property
    def state(self) -> str:
        """`closed`, `open` or `half_open`, as health reports it."""
        if self._open_until is None:
            return "closed"
        if self._clock() < self._open_until:
            return "open"
        return "half_open"

    @property
    def open_until(self) -> float | None:
        """When the open period ends (on the breaker's clock), None while closed: panic probes the earliest."""
        return self._open_until

    @property
    def trial_running(self) -> bool:
        """Whether a half-open trial or a panic probe is in flight (there is never more than one)."""
        return self._trial_running

    def allow(self) -> bool:
        """Whether to call the provider now; in half open, only one trial call at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._trial_running:
            return False
        self._trial_running = True
        return True

    def allow_probe(self) -> bool:
        """Take the trial slot before the open period ends: the panic probe, when no provider allows a call."""
        if self._open_until is None or self._trial_running:
            return False
        self._trial_running = True
        return True

    def record_success(self, trial: bool = False) -> None:
        """A good answer closes the circuit; `trial` says this call held the trial slot, which it frees.

        A call that began while the circuit was closed leaves the slot alone: a probe may still be in flight.
        """
        self._failures = 0
        self._open_until = None
        if trial:
            self._trial_running = False

    def record_failure(self, retry_after: float | None = None, trial: bool = False) -> None:
        """Count a failure; open on the threshold, on a failed trial, or for a 429's Retry-After."""
        self._failures += 1
        if trial:
            self._trial_running = False
        if retry_after is not None and retry_after > 0:
            self._open_until = max(self._open_until or 0.0, self._clock() + retry_after)
        elif trial or self._failures >= self.threshold:
            self._open_until = self._clock() + self.cooldown

    def release_trial(self) -> None:
        """A trial call that ended without a verdict (cancelled) frees the slot."""
        self._trial_running = False


def claim_panic_probe(candidates: Sequence[tuple[T, CircuitBreaker]]) -> T | None:
    """When no breaker allows a call, pick (and claim) the one to probe anyway, as Envoy's panic routing does.

    The open circuit whose open period ends first, ties going to the earlier candidate (`AI_PROVIDERS` order);
    a circuit with a trial or probe already in flight is passed over, so concurrent messages never stack calls
    on one dead provider. None when every candidate is closed or already being probed.
    """
    waiting = [
        (breaker.open_until, position)
        for position, (_, breaker) in enumerate(candidates)
        if breaker.open_until is not None and not breaker.trial_running
    ]
    if not waiting:
        return None
    item, breaker = candidates[min(waiting)[1]]
    return item if breaker.allow_probe() else None
