"""Fakes the unit tests share: nothing here touches Redis, a socket or the wall clock."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that only moves when told to (what CircuitBreaker and ProviderChain take as `clock`)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass at once."""
        self.now += seconds
