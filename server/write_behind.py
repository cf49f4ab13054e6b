"""Messages survive a Redis outage: a bounded, ordered, per-process buffer written out when Redis returns."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import ApiError
from server.sessions import AppendResult, SessionManager

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, TimeoutError)


@dataclass(slots=True)
class _Pending:
    session_id: str
    message: dict[str, Any]
    client_message_id: str | None


class WriteBehindStore:
    """Appends through SessionManager; while Redis is unreachable (or older writes still wait) messages queue here.

    Order is kept: once anything waits, every later message waits behind it. A full buffer refuses new
    messages with `unavailable` instead of dropping them.
    """

    def __init__(self, sessions: SessionManager, capacity: int, retry_interval: float = 0.5) -> None:
        self.sessions = sessions
        self.capacity = capacity
        self.retry_interval = retry_interval
        self._pending: deque[_Pending] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def depth(self) -> int:
        """Messages waiting for Redis."""
        return len(self._pending)

    async def append(
        self,
        session_id: str,
        message: dict[str, Any],
        *,
        client_message_id: str | None = None,
        context_size: int = 0,
    ) -> AppendResult:
        """Store now when possible, else buffer; the caller carries on either way."""
        if not self._pending:
            try:
                return await self.sessions.append(
                    session_id, message, client_message_id=client_message_id, context_size=context_size
                )
            except REDIS_DOWN as err:
                logger.warning("redis unreachable ({}): buffering messages", type(err).__name__)
        return self._buffer(session_id, message, client_message_id)

    async def finish_reply(self, session_id: str, messages: list[dict[str, Any]], **bookkeeping: Any) -> None:
        """Store an answer with its counters in one round trip; while Redis is away, buffer the messages alone."""
        if not self._pending:
            try:
                await self.sessions.finish_reply(session_id, messages, **bookkeeping)
                return
            except REDIS_DOWN as err:
                logger.warning("redis unreachable ({}): buffering messages, the reply's counters are lost", type(err).__name__)
        for message in messages:
            self._buffer(session_id, message, None)

    def _buffer(self, session_id: str, message: dict[str, Any], client_message_id: str | None) -> AppendResult:
        if client_message_id:
            for item in self._pending:
                if item.session_id == session_id and item.client_message_id == client_message_id:
                    return AppendResult(message=item.message, duplicate=True, context=[], state="active")
        if len(self._pending) >= self.capacity:
            raise ApiError("unavailable", "Storage is unavailable right now; please retry shortly.", retry_after=5)
        self._pending.append(_Pending(session_id, message, client_message_id))
        self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="write-behind")
        return AppendResult(message=message, duplicate=False, context=[], state="active")

    async def _flush_loop(self) -> None:
        """Write the buffer out in order as soon as Redis answers again."""
        while self._pending:
            item = self._pending[0]
            try:
                await self.sessions.append(item.session_id, item.message, client_message_id=item.client_message_id)
            except REDIS_DOWN:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.retry_interval)
                continue
            except ApiError as err:  # the session vanished meanwhile: nothing left to attach it to
                logger.warning("dropping a buffered message for session {}: {}", item.session_id, err.message)
            except Exception:
                logger.exception("buffered write failed; retrying")
                await asyncio.sleep(self.retry_interval)
                continue
            self._pending.popleft()
        logger.info("redis is back: buffered messages written")

    async def drain(self, timeout: float) -> None:
        """On shutdown, give the buffer a last chance to reach Redis."""
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout)
        if self._pending:
            logger.error("{} buffered messages could not be written to Redis before shutdown", len(self._pending))
