"""Reply leases: the replies this process owes are renewed while it lives; those of a process that died are taken over."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from loguru import logger

from server.storage.messages import MessageStore, ReplyLease

RECOVERY_ATTEMPTS = 2  # a reply is written again at most once after its owner died; then it is marked incomplete
TAKEOVER_INTERVAL_SECONDS = 1.0

OrphanHandler = Callable[[str, dict[str, Any]], bool]  # (session, pending reply) -> False once no longer taken


class ReplyLeases:
    """Sessions whose awaited reply this process owns, their leases kept alive, and the orphans of others found."""

    def __init__(self, messages: MessageStore, *, owner: str, seconds: float) -> None:
        self._messages = messages
        self._owner = owner
        self._seconds = seconds
        self._held: set[str] = set()
        self._background: list[asyncio.Task[None]] = []

    def hold(self, session_id: str) -> None:
        """This process owes the session's awaited reply: renew its lease until `drop`."""
        self._held.add(session_id)

    def drop(self, session_id: str) -> None:
        """The reply is written (or left to its lease to run out)."""
        self._held.discard(session_id)

    async def renew(self, session_id: str, message_id: str, lease: ReplyLease) -> None:
        """Lease the reply a stored message awaits (again, after an orphan's reply was finished first)."""
        await self._messages.lease(session_id, message_id, lease)

    async def release(self, session_id: str) -> None:
        """The awaited reply exists after all, or will never be written: nothing is left to finish."""
        await self._messages.release_lease(session_id)

    def start(self, on_orphan: OrphanHandler) -> None:
        """Renew this process's leases, and hand replies whose owner stopped renewing theirs to `on_orphan`."""
        if not self._background:
            self._background = [
                asyncio.create_task(self._renew_held(), name="reply-leases"),
                asyncio.create_task(self._take_over(on_orphan), name="reply-takeover"),
            ]

    async def stop(self) -> None:
        """Stop both loops."""
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew_held(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(0.25 if failing else self._seconds / 3)  # failing: renew as soon as Redis is back
            if not self._held:
                continue
            try:
                await self._messages.renew_leases(list(self._held), self._seconds)
            except Exception as err:
                if not failing:
                    logger.warning("could not renew reply leases: {}", type(err).__name__)
                failing = True
            else:
                failing = False

    async def _take_over(self, on_orphan: OrphanHandler, interval: float = TAKEOVER_INTERVAL_SECONDS) -> None:
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                # One renew interval of grace: after a Redis outage, live owners renew before anyone takes over.
                taken = await self._messages.take_expired_leases(self._owner, self._seconds, grace=self._seconds / 3)
            except Exception as err:
                if not failing:
                    logger.warning("could not look for orphaned replies: {}", type(err).__name__)
                failing = True
                continue
            failing = False
            for session_id, pending in taken:
                if not on_orphan(session_id, pending):
                    break
                logger.warning(
                    "session {}: the process answering message {} stopped; finishing the reply here (attempt {})",
                    session_id,
                    pending.get("replyTo"),
                    pending.get("attempt"),
                )
