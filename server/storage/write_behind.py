"""Conversations go on through a Redis outage: an ordered, spooled, per-process buffer written out when Redis returns."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from server.contract import Message
from server.storage.errors import STORAGE_DOWN, BufferFull, StorageError
from server.storage.messages import (
    AppendResult,
    BudgetCharge,
    BudgetSettlement,
    FinishedReply,
    MessageStore,
    ReplyLease,
    Streaks,
)
from server.storage.spool import Spool

RECENT_SESSIONS_KEPT = 5_000
RECENT_MESSAGES_KEPT = 50
POISON_ATTEMPTS = 5
FULL_RETRY_AFTER = 5.0  # seconds a client refused by a full buffer is told to wait

Replayer = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class _Pending:
    seq: int
    kind: str  # "append", "finish", or a kind a replayer was registered for ("escalation")
    session_id: str
    body: dict[str, Any]
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "sessionId": self.session_id, "body": self.body}


@dataclass(slots=True)
class _Recent:
    """What this process last knew of a session: its latest messages, its state and its token count."""

    messages: deque[Message] = field(default_factory=lambda: deque(maxlen=RECENT_MESSAGES_KEPT))
    state: str = "active"
    session_tokens: int = 0
    day_tokens: int = 0


class WriteBehindStore:
    """Appends and finished replies go through the MessageStore; while Redis is unreachable (or older writes still
    wait) they queue here, in order, each one on disk (the spool) before it is acknowledged.

    Order is kept: once anything waits, every later write waits behind it. The conversation's recent messages
    are kept per session, so the AI answers with context during an outage. A full buffer refuses new messages
    (BufferFull, which clients see as `unavailable`) instead of dropping them.
    """

    def __init__(
        self,
        messages: MessageStore,
        capacity: int,
        retry_interval: float = 0.5,
        *,
        spool: Spool | None = None,
        lease_owner: str = "",
        lease_seconds: float = 5.0,
    ) -> None:
        self.messages = messages
        self.capacity = capacity
        self.retry_interval = retry_interval
        self.spool = spool
        self.lease_owner = lease_owner
        self.lease_seconds = lease_seconds
        self._pending: deque[_Pending] = deque()
        self._seq = itertools.count(1)
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._replayers: dict[str, Replayer] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def depth(self) -> int:
        """Writes waiting for Redis."""
        return len(self._pending)

    def on_replay(self, kind: str, replayer: Replayer) -> None:
        """Who writes a buffered entry of `kind` (other than messages) once Redis is back."""
        self._replayers[kind] = replayer

    def adopt_orphans(self) -> int:
        """At start: take over what a process that died left in its spool (written out once Redis answers)."""
        if self.spool is None:
            return 0
        return self.spool.take_orphans(lambda entry: self._queue(entry["kind"], entry["sessionId"], entry["body"]))

    # Writes -----------------------------------------------------------------------------------
    async def append(
        self,
        session_id: str,
        message: Message,
        *,
        client_message_id: str | None = None,
        context_size: int = 0,
        reply_id: str | None = None,
        rate_limit: int = 0,
        budget: BudgetCharge | None = None,
        language: str | None = None,
    ) -> AppendResult:
        """Store now when possible, else buffer; the caller carries on either way.

        With a `reply_id`, the answer this message awaits is leased to this process (see ReplyLease). The rate
        limit and the budget charge apply only to a message stored now: a buffered one is neither limited (limits
        fail open while Redis is away) nor charged (its result's `budget` is None).
        """
        if not self._pending:
            try:
                result = await self.messages.append(
                    session_id,
                    message,
                    client_message_id=client_message_id,
                    context_size=context_size,
                    lease=self.lease_for(reply_id),
                    rate_limit=rate_limit,
                    budget=budget,
                    language=language,
                )
            except STORAGE_DOWN as err:
                logger.warning("redis unreachable ({}): buffering writes", type(err).__name__)
            else:
                self._remember_append(session_id, result)
                return result
        return self._buffer_append(session_id, message, client_message_id, context_size, reply_id)

    async def finish_reply(self, session_id: str, messages: list[Message], **bookkeeping: Any) -> FinishedReply:
        """Store an answer with its counters in one round trip; while Redis is away, buffer it whole.

        Reports today's global budget counter and the session's counts in a row when stored now (see
        MessageStore.finish_reply); a buffered reply reports nothing (its counts move when it is written).
        """
        if not self._pending:
            try:
                used = await self.messages.finish_reply(session_id, messages, **bookkeeping)
            except STORAGE_DOWN as err:
                logger.warning("redis unreachable ({}): buffering writes", type(err).__name__)
            else:
                self._remember_messages(session_id, messages)
                return used
        bookkeeping["attempts"] = [list(a) for a in bookkeeping.get("attempts", ())]
        settle: BudgetSettlement | None = bookkeeping.get("settle")
        if settle is not None:
            bookkeeping["settle"] = {
                "counters": list(settle.counters),
                "difference": settle.difference,
                "ttl": settle.ttl_seconds,
            }
        streaks: Streaks | None = bookkeeping.get("streaks")
        if streaks is not None:
            bookkeeping["streaks"] = {
                "miss": streaks.miss,
                "negative": streaks.negative,
                "misses_limit": streaks.misses_limit,
                "negatives_limit": streaks.negatives_limit,
            }
        self._remember_messages(session_id, messages)
        self._queue("finish", session_id, {"messages": messages, "bookkeeping": bookkeeping})
        return FinishedReply()

    async def run_or_defer(self, kind: str, session_id: str, body: dict[str, Any]) -> None:
        """Run the replayer registered for `kind` now, or (Redis unreachable, or writes waiting) buffer it."""
        if not self._pending:
            try:
                await self._replayers[kind](session_id, body)
                return
            except STORAGE_DOWN as err:
                logger.warning("redis unreachable ({}): buffering {}", type(err).__name__, kind)
        self._queue(kind, session_id, body)

    def lease_for(self, reply_id: str | None) -> ReplyLease | None:
        """The lease this process takes on a reply it is about to write (none without an owner name)."""
        if reply_id is None or not self.lease_owner:
            return None
        return ReplyLease(self.lease_owner, reply_id, self.lease_seconds)

    def _buffer_append(
        self,
        session_id: str,
        message: Message,
        client_message_id: str | None,
        context_size: int,
        reply_id: str | None,
    ) -> AppendResult:
        if client_message_id:
            for item in self._pending:
                if (
                    item.kind == "append"
                    and item.session_id == session_id
                    and item.body.get("clientMessageId") == client_message_id
                ):
                    return AppendResult(message=item.body["message"], duplicate=True, context=[], state="active")
        recent = self._recent.get(session_id)
        context = list(recent.messages)[-context_size:] if recent and context_size > 0 else []
        body: dict[str, Any] = {"message": message, "clientMessageId": client_message_id, "replyId": reply_id}
        self._queue("append", session_id, body)
        self._remember_messages(session_id, [message])
        return AppendResult(
            message=message,
            duplicate=False,
            context=context,
            state=recent.state if recent else "active",
            session_tokens=recent.session_tokens if recent else 0,
            day_tokens=recent.day_tokens if recent else 0,
        )

    def _queue(self, kind: str, session_id: str, body: dict[str, Any]) -> None:
        """Buffer one write: on disk first, then in memory, then wake the flusher."""
        if len(self._pending) >= self.capacity:
            raise BufferFull(retry_after=FULL_RETRY_AFTER)
        item = _Pending(next(self._seq), kind, session_id, body)
        if self.spool is not None:
            try:
                self.spool.write(item.to_json())
            except OSError as err:  # a full or read-only disk: keep it in memory, and say so
                logger.error("could not spool a buffered write to disk ({}): kept in memory only", err)
        self._pending.append(item)
        self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="write-behind")

    # What this process knows of recent conversations ---------------------------------------------
    def recent_messages(self, session_id: str) -> list[Message]:
        """The latest messages of a conversation as this process last saw them (for rejoins in an outage)."""
        recent = self._recent.get(session_id)
        return list(recent.messages) if recent is not None else []

    def _recent_for(self, session_id: str) -> _Recent:
        recent = self._recent.get(session_id)
        if recent is None:
            recent = self._recent[session_id] = _Recent()
            if len(self._recent) > RECENT_SESSIONS_KEPT:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(session_id)
        return recent

    def _remember_append(self, session_id: str, result: AppendResult) -> None:
        recent = self._recent_for(session_id)
        if not result.duplicate:
            messages = recent.messages
            # Usually what we hold already ends where the context ends; rebuild only when it does not.
            if result.context and not (messages and messages[-1].get("id") == result.context[-1].get("id")):
                messages.clear()
                messages.extend(result.context)
            messages.append(result.message)
        recent.state = result.state
        recent.session_tokens = result.session_tokens
        recent.day_tokens = result.day_tokens

    def _remember_messages(self, session_id: str, messages: list[Message]) -> None:
        self._recent_for(session_id).messages.extend(messages)

    # Writing the buffer out -----------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        """Write the buffer out in order as soon as Redis answers again."""
        while self._pending:
            item = self._pending[0]
            try:
                await self._write(item)
            except STORAGE_DOWN:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.retry_interval)
                continue
            except StorageError as err:  # the session vanished meanwhile (SessionGone): nothing left to attach it to
                logger.warning("dropping a buffered {} for session {}: {}", item.kind, item.session_id, type(err).__name__)
            except Exception:
                item.attempts += 1
                if item.attempts < POISON_ATTEMPTS:
                    logger.exception("buffered {} failed; retrying", item.kind)
                    await asyncio.sleep(self.retry_interval)
                    continue
                logger.exception(
                    "buffered {} for session {} dropped after {} attempts", item.kind, item.session_id, item.attempts
                )
            self._pending.popleft()
            if self.spool is not None:
                self.spool.done(item.seq)
        if self.spool is not None:
            self.spool.clear()
        logger.info("redis is back: buffered writes stored")

    async def _write(self, item: _Pending) -> None:
        body = item.body
        if item.kind == "append":
            await self.messages.append(
                item.session_id,
                body["message"],
                client_message_id=body.get("clientMessageId"),
                lease=self.lease_for(body.get("replyId")),
            )
        elif item.kind == "finish":
            bookkeeping = dict(body["bookkeeping"])
            bookkeeping["attempts"] = [tuple(a) for a in bookkeeping.get("attempts", ())]
            settle = bookkeeping.get("settle")
            if settle is not None:
                bookkeeping["settle"] = BudgetSettlement(tuple(settle["counters"]), int(settle["difference"]), int(settle["ttl"]))
            if bookkeeping.get("streaks") is not None:
                bookkeeping["streaks"] = Streaks(**bookkeeping["streaks"])
            await self.messages.finish_reply(item.session_id, body["messages"], **bookkeeping)
        else:
            await self._replayers[item.kind](item.session_id, body)

    async def drain(self, timeout: float) -> None:
        """On shutdown, give the buffer a last chance to reach Redis; what is left stays in the spool."""
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout)
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._pending:
            if self.spool is not None:
                logger.warning(
                    "{} buffered writes could not reach Redis before shutdown; kept in {} for the next start",
                    len(self._pending),
                    self.spool.path,
                )
            else:
                logger.error("{} buffered writes could not be written to Redis before shutdown", len(self._pending))
        if self.spool is not None:
            self.spool.close()
