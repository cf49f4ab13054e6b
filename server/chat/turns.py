"""Each session's messages handled one at a time, in arrival order, across processes; refused cleanly at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from server.chat.reply_stream import ReplyListener
from server.contract import EscalationRecord, Message
from server.errors import ApiError, api_error_from, storage_unavailable
from server.settings import ChatSettings
from server.storage.errors import STORAGE_DOWN, LockError
from server.storage.messages import MessageStore
from server.storage.write_behind import WriteBehindStore

if TYPE_CHECKING:
    from server.storage.messages import SessionLock

LOCK_RENEW_SECONDS = 1.5


def shutting_down() -> ApiError:
    """What a message refused by a shutdown gets: its client retries (elsewhere, or here once back)."""
    return ApiError("unavailable", "The server is restarting; please retry.", retry_after=1)


@dataclass(slots=True)
class TurnResult:
    """What one user message led to: the stored user message, the answer and any escalation."""

    session_id: str
    user_message: Message
    reply: Message | None
    escalation: EscalationRecord | None
    duplicate: bool = False


@dataclass(slots=True)
class Turn:
    """A place in a session's queue, taken when the message arrived; filled once the message is admitted."""

    stored: asyncio.Future[Message]
    done: asyncio.Future[TurnResult]
    admitted: asyncio.Future[bool]
    text: str = ""
    client_message_id: str | None = None
    listener: ReplyListener | None = None
    recover: dict[str, Any] | None = None  # a reply whose owner died, to be finished here
    receivable: Callable[[], bool] | None = None  # whether anyone can still receive its ack and reply
    on_end: Callable[[], None] | None = None  # called once the turn is over, however it ended


TurnHandler = Callable[[str, Turn], Awaitable[None]]


class TurnQueue:
    """One worker per busy session drains its queue; across processes a Redis lock keeps the session's order."""

    def __init__(
        self,
        handle: TurnHandler,
        *,
        messages: MessageStore,
        store: WriteBehindStore,
        owner: str,
        settings: ChatSettings,
    ) -> None:
        self._handle = handle
        self._messages = messages
        self._store = store
        self._owner = owner  # this process, in lock tokens
        self._settings = settings
        self._queues: dict[str, deque[Turn]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self.closing = False  # shutting down: no new turn is taken

    @property
    def busy_sessions(self) -> int:
        """Sessions with a message being handled in this process."""
        return len(self._queues)

    @property
    def waiting(self) -> int:
        """Turns queued in this process (the ones being handled included)."""
        return sum(len(queue) for queue in self._queues.values())

    async def submit(
        self,
        session_id: str,
        text: str,
        client_message_id: str | None,
        listener: ReplyListener | None,
        admit: Callable[[], Awaitable[Any]] | None,
        receivable: Callable[[], bool] | None,
    ) -> tuple[Message, asyncio.Future[TurnResult]]:
        """Take the message's place at once, then admit it; returns once it is stored (see ChatService.submit)."""
        turn = self._reserve(session_id)
        turn.receivable = receivable
        try:
            if admit is not None:
                await admit()
        except BaseException:
            if not turn.admitted.done():
                turn.admitted.set_result(False)
            raise
        if not turn.admitted.done():  # not refused meanwhile by a shutdown
            turn.text, turn.client_message_id, turn.listener = text, client_message_id, listener
            turn.admitted.set_result(True)
        return await turn.stored, turn.done

    def push_recovery(self, session_id: str, pending: dict[str, Any], on_end: Callable[[], None]) -> None:
        """Finish a dead process's reply before the session's next message; nobody waits for its outcome."""
        turn = self._reserve(session_id, first=True)
        turn.recover = pending
        turn.on_end = on_end
        turn.admitted.set_result(True)
        turn.stored.add_done_callback(_ignore_result)
        turn.done.add_done_callback(_ignore_result)

    def _reserve(self, session_id: str, *, first: bool = False) -> Turn:
        """A place at the end (or, for a reply to finish, the front) of the session's queue."""
        if self.closing:
            raise shutting_down()
        loop = asyncio.get_running_loop()
        turn = Turn(loop.create_future(), loop.create_future(), loop.create_future())
        queue = self._queues.get(session_id)
        limit = self._settings.max_pending_per_session
        if not first and queue is not None and 0 < limit <= len(queue):
            raise ApiError(
                "rate_limited",
                "Too many messages are waiting in this conversation; wait for the replies, then send again.",
                retry_after=2,
            )
        if queue is None:
            queue = self._queues[session_id] = deque()
            worker = asyncio.create_task(self._drain(session_id, queue), name=f"session-{session_id}")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        if first:
            queue.appendleft(turn)
        else:
            queue.append(turn)
        return turn

    def close(self) -> None:
        """Take no new turn from now on (the ones queued are left to `drain`)."""
        self.closing = True

    async def drain(self, timeout: float) -> None:
        """Shutdown: take no new message, let the turns being handled finish within `timeout`, then cut them.

        Messages still queued (not stored, not acknowledged) are refused with `unavailable`.
        """
        self.closing = True
        for queue in self._queues.values():
            _refuse_waiting(queue)
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=max(0.0, timeout))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    async def _drain(self, session_id: str, queue: deque[Turn]) -> None:
        """The session's worker: its turns one at a time, until none is left."""
        try:
            while queue:
                turn = queue.popleft()
                try:
                    if not await turn.admitted:
                        continue
                except asyncio.CancelledError:
                    _fail(turn, shutting_down())
                    raise
                if self.closing:  # shutdown: nothing new starts (a reply to finish is left to its lease)
                    _fail(turn, shutting_down())
                    continue
                if turn.stored.cancelled() or (turn.receivable is not None and not turn.receivable()):
                    # Its sender left and nobody else listens (socket), or its caller gave up (REST): storing and
                    # answering it would only spend provider calls nobody reads.
                    logger.info("session {}: dropped a waiting message: nobody is left to receive it", session_id)
                    _fail(turn, ApiError("unavailable", "Nobody is listening to this conversation.", retry_after=1))
                    continue
                try:
                    async with self._locked(session_id):
                        await self._handle(session_id, turn)
                except LockError:
                    _fail(turn, ApiError("unavailable", "The conversation is busy; please retry.", retry_after=2))
                except ApiError as err:  # refused as it was stored (its rate limit): the sender is told why
                    _fail(turn, err)
                except asyncio.CancelledError:
                    _fail(turn, shutting_down())
                    raise
                except STORAGE_DOWN:
                    logger.warning("session {}: storage unreachable while handling a message", session_id)
                    _fail(turn, storage_unavailable())
                except Exception as err:
                    logger.exception("session {}: message handling failed", session_id)
                    _fail(turn, api_error_from(err) or ApiError("internal", "Something went wrong."))
                finally:
                    if turn.on_end is not None:
                        turn.on_end()
        finally:
            _refuse_waiting(queue)
            if self._queues.get(session_id) is queue:
                del self._queues[session_id]

    @contextlib.asynccontextmanager
    async def _locked(self, session_id: str) -> AsyncIterator[None]:
        """Across processes, hold the session's Redis lock (renewed) while one message is handled.

        With Redis unreachable, or writes still buffered, this process's own queue keeps the order: the lock
        is skipped rather than turning the outage into an error.
        """
        cross_process = self._settings.cross_process_order and not self._store.depth
        lock = self._messages.session_lock(session_id, f"{self._owner}:{uuid.uuid4().hex}") if cross_process else None
        acquired = False
        if lock is not None:
            try:
                acquired = await lock.acquire()
            except STORAGE_DOWN as err:
                logger.warning("session {}: lock unavailable (redis unreachable: {})", session_id, type(err).__name__)
                lock = None
            else:
                if not acquired:
                    raise LockError("the session stayed locked")
        keeper = _LockKeeper(lock) if lock is not None else None
        try:
            yield
        finally:
            if keeper is not None:
                keeper.stop()
            if lock is not None and acquired:
                with contextlib.suppress(LockError, *STORAGE_DOWN):
                    await lock.release()


class _LockKeeper:
    """Renews a session lock every LOCK_RENEW_SECONDS while its message is handled (its TTL only matters if we crash).

    A timer, and a task only when it is due: most turns end long before the first renewal.
    """

    def __init__(self, lock: SessionLock, every: float = LOCK_RENEW_SECONDS) -> None:
        self._lock = lock
        self._every = every
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(every, self._due)
        self._renewing: asyncio.Task[None] | None = None

    def _due(self) -> None:
        self._timer = None
        self._renewing = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        try:
            await self._lock.reacquire()
        except Exception as err:
            logger.warning("could not renew a session lock: {}", type(err).__name__)
        self._timer = self._loop.call_later(self._every, self._due)

    def stop(self) -> None:
        """The message is handled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._renewing is not None and not self._renewing.done():
            self._renewing.cancel()


def _ignore_result(future: asyncio.Future[Any]) -> None:
    """Nobody waits for a taken-over reply's futures: mark their outcome retrieved."""
    if not future.cancelled():
        future.exception()


def _refuse_waiting(queue: deque[Turn]) -> None:
    """Messages still waiting for their turn (never stored) are refused, so their clients retry."""
    while queue:
        turn = queue.popleft()
        _fail(turn, shutting_down())
        if not turn.admitted.done():
            turn.admitted.set_result(False)


def _fail(turn: Turn, err: BaseException) -> None:
    """End a turn's futures with `err` (those not already settled)."""
    for future in (turn.stored, turn.done):
        if not future.done():
            future.set_exception(err)
            future.exception()  # mark retrieved: nobody may be waiting for the reply
