"""Fakes the unit tests share: nothing here touches Redis, a socket or the wall clock."""

from __future__ import annotations

import asyncio
from typing import Any


class FakeClock:
    """A monotonic clock that only moves when told to (what CircuitBreaker and ProviderChain take as `clock`)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass at once."""
        self.now += seconds


class RecordingServer:
    """Stands in for the Socket.IO server under an `Emitter`: records every emit exactly as it would go out."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, str | None, str | None]] = []
        self.arrived = asyncio.Event()

    async def emit(self, event: str, data: Any, room: str | None = None, namespace: str | None = None, **_: Any) -> None:
        """Record one emit and wake whoever waits for the next one."""
        self.sent.append((event, data, room, namespace))
        self.arrived.set()

    def events(self, name: str) -> list[Any]:
        """The payloads of every `name` event, in order."""
        return [data for event, data, _, _ in self.sent if event == name]

    async def next_event(self, timeout: float = 2.0) -> None:
        """Wait until something more is emitted (instead of sleeping for a guessed time)."""
        self.arrived.clear()
        await asyncio.wait_for(self.arrived.wait(), timeout)
