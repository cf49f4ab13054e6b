"""Per-provider circuit breaker: skip a failing provider for a while, then try it once."""

from __future__ import annotations

import time
from collections.abc import Callable


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

    def allow(self) -> bool:
        """Whether to call the provider now; in half open, only one trial call at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._trial_running:
            return False
        self._trial_running = True
        return True

    def record_success(self) -> None:
        """A good answer closes the circuit."""
        self._failures = 0
        self._open_until = None
        self._trial_running = False

    def record_failure(self, retry_after: float | None = None) -> None:
        """Count a failure; open on the threshold, on a failed trial, or for a 429's Retry-After."""
        self._failures += 1
        trial_failed = self._trial_running
        self._trial_running = False
        if retry_after is not None and retry_after > 0:
            self._open_until = max(self._open_until or 0.0, self._clock() + retry_after)
        elif trial_failed or self._failures >= self.threshold:
            self._open_until = self._clock() + self.cooldown

    def release_trial(self) -> None:
        """A trial call that ended without a verdict (cancelled) frees the slot."""
        self._trial_running = False
