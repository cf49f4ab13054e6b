"""The handoff's timers: a wait past AGENT_WAIT_TIMEOUT becomes a ticket, an agent silent past AGENT_IDLE_TIMEOUT
hands the conversation back to the AI, and a session that expired while queued or held leaves nothing behind.

Every process runs one sweeper; Redis scripts make sure each expiry happens once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from loguru import logger

from server.contract import Trigger
from server.handoff.tickets import TicketDesk
from server.realtime.emitter import Emitter
from server.settings import HandoffSettings
from server.storage.queue import QueueStore

if TYPE_CHECKING:  # the handoff service builds its sweeper: a type-only import, no cycle
    from server.handoff.service import HandoffService

EXPIRY_SCAN_SECONDS = 10  # how often the sweep looks for sessions that expired while queued or held
SWEEP_INTERVAL_SECONDS = 1.0


class Sweeper:
    """Runs the handoff's timers once a second until stopped."""

    def __init__(
        self,
        handoff: HandoffService,
        tickets: TicketDesk,
        *,
        queue: QueueStore,
        emitter: Emitter,
        settings: HandoffSettings,
    ) -> None:
        self._handoff = handoff
        self._tickets = tickets
        self._queue = queue
        self._emitter = emitter
        self._settings = settings
        self._stopping = asyncio.Event()
        self._last_expiry_scan_ms = 0
        self.expiry_scan_seconds = EXPIRY_SCAN_SECONDS

    async def sweep(self) -> None:
        """Tickets for waits past AGENT_WAIT_TIMEOUT, the AI back after AGENT_IDLE_TIMEOUT; refresh our agents."""
        await self._handoff.refresh_presence()
        now_ms = int(time.time() * 1000)
        wait_cutoff = now_ms - int(self._settings.wait_timeout * 1000)
        idle_cutoff = now_ms - int(self._settings.idle_timeout * 1000)
        # A session that expired while queued or held leaves nothing behind for anyone to claim or sweep. Sessions
        # live SESSION_TIMEOUT (minutes), so looking every EXPIRY_SCAN_SECONDS is enough (it reads up to 400 keys).
        expired: list[str] = []
        if now_ms - self._last_expiry_scan_ms >= self.expiry_scan_seconds * 1000:
            self._last_expiry_scan_ms = now_ms
            expired = await self._queue.drop_expired()
        for session_id in expired:
            logger.info("session {}: expired while queued or held; its queue and hold entries removed", session_id)
            await self._emitter.session_ended(session_id, "expired")
        waiting, idle = await self._queue.overdue(wait_cutoff, idle_cutoff)
        changed = bool(expired)
        for session_id in waiting:
            entry = await self._queue.take_overdue_waiting(session_id, wait_cutoff)
            if entry is None:
                continue
            changed = True
            await self._tickets.open_unless_limited(
                session_id, entry.get("trigger", Trigger.ERROR), entry.get("reason", "No agent was free.")
            )
        if changed:
            await self._handoff.broadcast_queue()
        for session_id in idle:
            await self._handoff.end_idle_hold(session_id, idle_cutoff)

    async def run(self, interval: float = SWEEP_INTERVAL_SECONDS) -> None:
        """The timer loop: a failing sweep (Redis unreachable) is logged once per outage and retried."""
        failing = False
        while not self._stopping.is_set():
            try:
                await self.sweep()
            except Exception as err:
                if not failing:  # once per outage, not once a second
                    logger.warning("handoff sweep failed: {} (retrying every {:g} s)", type(err).__name__, interval)
                failing = True
            else:
                if failing:
                    logger.info("handoff sweep works again")
                failing = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    def stop(self) -> None:
        """Ask the loop to finish its current sweep and stop (never cut a Redis call in half)."""
        self._stopping.set()
