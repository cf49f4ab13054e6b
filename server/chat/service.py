"""ChatService: turns a visitor's message into a stored, streamed, possibly escalated answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from server.ai.chain import LOCAL_PROVIDER, ChainDelta, ChainDone, ChainFailed, ChainInterrupted, ProviderChain
from server.ai.providers.base import ChatTurn, ProviderRequest
from server.chat.budgets import Admission, BudgetPolicy, Budgets, estimate_tokens
from server.chat.escalation import Escalation, EscalationRules
from server.chat.prompt import PromptBuilder
from server.chat.reply_stream import Broadcaster, ReplyListener, ReplyStream
from server.errors import ApiError, storage_unavailable
from server.handoff.service import HandoffService
from server.ops.metrics import Metrics
from server.storage.sessions import SessionManager, new_id, now_iso
from server.storage.write_behind import REDIS_DOWN, WriteBehindStore

BUDGET_MESSAGE = (
    "I've reached the limit of what I can answer in this conversation. A member of our support team will follow up with you."
)
FAILURE_MESSAGE = "I'm sorry, I can't answer right now. A member of our support team will follow up with you shortly."
INTERRUPTED_REASON = "The reply could not be finished (the server answering it stopped)."
REPLY_LEASE_SECONDS = 5.0
RECOVERY_ATTEMPTS = 2  # a reply is written again at most once after its owner died; then it is marked incomplete


def _shutting_down() -> ApiError:
    return ApiError("unavailable", "The server is restarting; please retry.", retry_after=1)


@dataclass(slots=True)
class TurnResult:
    """What one user message led to: the stored user message, the answer and any escalation."""

    session_id: str
    user_message: dict[str, Any]
    reply: dict[str, Any] | None
    escalation: dict[str, Any] | None
    duplicate: bool = False


@dataclass(slots=True)
class _Job:
    """A place in a session's queue, taken when the message arrived; filled once the message is admitted."""

    stored: asyncio.Future[dict[str, Any]]
    done: asyncio.Future[TurnResult]
    admitted: asyncio.Future[bool]
    text: str = ""
    client_message_id: str | None = None
    listener: ReplyListener | None = None
    recover: dict[str, Any] | None = None  # a reply whose owner died, to be finished here
    receivable: Callable[[], bool] | None = None  # whether anyone can still receive its ack and reply


@dataclass(slots=True)
class _Generation:
    task: asyncio.Task[Any]
    message_id: str
    stop_requested: bool = False


@dataclass(slots=True)
class _Outcome:
    text: str
    provider: str | None
    confidence: float | None = None
    failed: bool = False
    stopped: bool = False
    reasons: tuple[str, ...] = field(default_factory=tuple)
    tokens: int = 0
    attempts: tuple[tuple[str, bool], ...] = ()


class ChatService:
    """Prompting, the provider chain, confidence and escalation; one message at a time per session."""

    def __init__(
        self,
        *,
        sessions: SessionManager,
        chain: ProviderChain,
        prompts: PromptBuilder,
        rules: EscalationRules,
        broadcaster: Broadcaster,
        max_history: int,
        flush_ms: int,
        flush_chars: int,
        handoff: HandoffService | None = None,
        store: WriteBehindStore | None = None,
        cross_process_order: bool = False,
        log_content: bool = True,
        budget_policy: BudgetPolicy | None = None,
        metrics: Metrics | None = None,
        instance_id: str = "",
        lease_seconds: float = REPLY_LEASE_SECONDS,
        max_pending_per_session: int = 0,
    ) -> None:
        self.sessions = sessions
        self.chain = chain
        self.prompts = prompts
        self.rules = rules
        self.broadcaster = broadcaster
        self.max_history = max_history
        self.flush_ms = flush_ms
        self.flush_chars = flush_chars
        self.handoff = handoff
        self.store = store or WriteBehindStore(sessions, capacity=10_000)
        self.cross_process_order = cross_process_order
        self.log_content = log_content
        self.metrics = metrics or Metrics()
        self.budgets = Budgets(
            sessions,
            budget_policy or BudgetPolicy(),
            self.metrics,
        )
        chain.paid_paused = lambda: self.budgets.degraded  # summaries make no paid call once degraded either
        self.max_pending_per_session = max_pending_per_session  # messages waiting per session (0: no limit)
        self._escalating: set[str] = set()  # sessions whose escalation this process is handling now
        self._queues: dict[str, deque[_Job]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._generating: dict[str, _Generation] = {}
        self._streams: dict[str, ReplyStream] = {}
        self.instance_id = instance_id
        self.lease_seconds = lease_seconds
        self._leased: set[str] = set()  # sessions whose awaited reply this process owns
        self._closing = False
        self._background: list[asyncio.Task[None]] = []
        self.store.on_replay("escalation", self._store_escalation)

    # Entry points -----------------------------------------------------------------------
    async def submit(
        self,
        session_id: str,
        text: str,
        client_message_id: str | None = None,
        listener: ReplyListener | None = None,
        *,
        admit: Callable[[], Awaitable[Any]] | None = None,
        receivable: Callable[[], bool] | None = None,
    ) -> tuple[dict[str, Any], asyncio.Future[TurnResult]]:
        """Queue a message behind the session's earlier ones; returns once it is stored, with the reply's future.

        The message's place in the queue is taken before anything is awaited, so arrival order is the order
        of storing and answering whatever `admit` (authentication, rate limits) awaits; if `admit` raises,
        the place is given up and the error goes to the caller. Beyond MAX_PENDING_PER_SESSION waiting messages
        the message is refused (`rate_limited`); a waiting message whose `receivable` says nobody can receive
        its ack or reply any more is dropped unstored when its turn comes.
        """
        job = self._reserve(session_id)
        job.receivable = receivable
        try:
            if admit is not None:
                await admit()
        except BaseException:
            if not job.admitted.done():
                job.admitted.set_result(False)
            raise
        if not job.admitted.done():  # not refused meanwhile by a shutdown
            job.text, job.client_message_id, job.listener = text, client_message_id, listener
            job.admitted.set_result(True)
        return await job.stored, job.done

    def _reserve(self, session_id: str, *, first: bool = False) -> _Job:
        """A place at the end (or, for a reply to finish, the front) of the session's queue."""
        if self._closing:
            raise _shutting_down()
        loop = asyncio.get_running_loop()
        job = _Job(loop.create_future(), loop.create_future(), loop.create_future())
        queue = self._queues.get(session_id)
        if not first and queue is not None and 0 < self.max_pending_per_session <= len(queue):
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
            queue.appendleft(job)
        else:
            queue.append(job)
        return job

    async def escalate(self, session_id: str, reason: str | None) -> dict[str, Any]:
        """The visitor asked for a person; idempotent while the session waits for, has, or has a ticket for one."""
        if session_id in self._escalating:  # taken before any await: concurrent requests see it at once
            return {"sessionId": session_id, "state": "escalating", "alreadyEscalated": True}
        self._escalating.add(session_id)
        try:
            state = await self._escalated_state(session_id)
            if state is not None:
                return {"sessionId": session_id, "state": state, "alreadyEscalated": True}
            escalation = self.rules.for_user_request(session_id, reason)
            await self._announce_escalation(escalation)
        finally:
            self._escalating.discard(session_id)
        return escalation.to_dict()

    async def _escalated_state(self, session_id: str) -> str | None:
        """The session's state when it is already with people (queue, agent, open ticket), else None."""
        try:
            session = await self.sessions.get(session_id)
            if session is None or session.state in ("waiting_agent", "agent"):
                return None if session is None else session.state
            if session.state == "ticket" and await self.sessions.open_ticket_id(session_id) is not None:
                return "ticket"
        except REDIS_DOWN:
            return None  # the escalation is buffered with the messages, as before
        return None

    def stop(self, session_id: str) -> bool:
        """Cancel the reply being written (its HTTP stream closes); the partial text is kept."""
        generation = self._generating.get(session_id)
        if generation is None or generation.task.done():
            return False
        generation.stop_requested = True
        generation.task.cancel()
        return True

    async def rejoined(self, session_id: str, token: str, rotate_after: float | None) -> str:
        """A visitor came back: renew the session, and hand out a new token after an idle spell (None: half its life).

        Of two holders of one token only the first rejoin rotates it; the second is refused (`unauthorized`).
        While Redis is unreachable (the token was verified from this process's memory) neither can be done;
        the visitor keeps the token it has.
        """
        try:
            new_token = await self.sessions.rotate_token_if_idle(session_id, token, rotate_after)
            await self.sessions.touch(session_id)
        except REDIS_DOWN:
            return token
        return new_token or token

    async def history_for_join(self, session_id: str, after_id: str | None, limit: int) -> list[dict[str, Any]]:
        """What a (re)joining client missed; during an outage, what this process still holds of it."""
        try:
            return await self.sessions.messages_after(session_id, after_id, limit)
        except REDIS_DOWN:
            recent = self.store.recent_messages(session_id)
            ids = [m.get("id") for m in recent]
            if after_id in ids:
                return recent[ids.index(after_id) + 1 :][:limit]
            return recent[-limit:]

    async def in_progress(self, session_id: str, history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """The reply still being written, for a rejoining client; None once it is in the history."""
        live = self._streams.get(session_id)
        if live is not None:
            return live.written
        if not self.cross_process_order:  # one process: no reply is being written anywhere else
            return None
        try:
            snapshot = await self.sessions.in_flight(session_id)
        except REDIS_DOWN:
            return None
        if snapshot is None or any(m.get("id") == snapshot["messageId"] for m in history):
            return None
        return {"messageId": snapshot["messageId"], "text": snapshot["text"], "index": snapshot["index"]}

    @property
    def generating(self) -> list[str]:
        """Sessions with a reply being written in this process."""
        return list(self._generating)

    @property
    def busy_sessions(self) -> int:
        """Sessions with a message being handled in this process."""
        return len(self._queues)

    async def drain(self, timeout: float) -> None:
        """Shutdown: take no new message, let the replies being written finish within `timeout`, then cut them.

        Messages still queued (not stored, not acknowledged) are refused with `unavailable`; a reply cut at the
        deadline is stored as incomplete with a system message. Nothing new starts after this.
        """
        self._closing = True
        for queue in self._queues.values():
            _refuse_waiting(queue)
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=max(0.0, timeout))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self._stop_background()

    # Leases: replies whose owner died are finished by another process ---------------------------
    def start(self) -> None:
        """Renew this process's reply leases and take over replies whose owner stopped renewing theirs."""
        if not self._background:
            self._background = [
                asyncio.create_task(self._renew_leases(), name="reply-leases"),
                asyncio.create_task(self._take_over_replies(), name="reply-takeover"),
            ]

    async def _stop_background(self) -> None:
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Stop the lease tasks (when drain did not already)."""
        self._closing = True
        await self._stop_background()

    async def _renew_leases(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(0.25 if failing else self.lease_seconds / 3)  # failing: renew as soon as Redis is back
            if not self._leased:
                continue
            try:
                await self.sessions.renew_leases(list(self._leased), self.lease_seconds)
            except Exception as err:
                if not failing:
                    logger.warning("could not renew reply leases: {}", type(err).__name__)
                failing = True
            else:
                failing = False

    async def _take_over_replies(self, interval: float = 1.0) -> None:
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                # One renew interval of grace: after a Redis outage, live owners renew before anyone takes over.
                taken = await self.sessions.take_expired_leases(
                    self.instance_id, self.lease_seconds, grace=self.lease_seconds / 3
                )
            except Exception as err:
                if not failing:
                    logger.warning("could not look for orphaned replies: {}", type(err).__name__)
                failing = True
                continue
            failing = False
            for session_id, pending in taken:
                if self._closing:
                    break
                logger.warning(
                    "session {}: the process answering message {} stopped; finishing the reply here (attempt {})",
                    session_id,
                    pending.get("replyTo"),
                    pending.get("attempt"),
                )
                self._leased.add(session_id)
                job = self._reserve(session_id, first=True)
                job.recover = pending
                job.admitted.set_result(True)
                job.stored.add_done_callback(_ignore_result)
                job.done.add_done_callback(_ignore_result)

    # The per-session worker -------------------------------------------------------------
    async def _drain(self, session_id: str, queue: deque[_Job]) -> None:
        try:
            while queue:
                job = queue.popleft()
                try:
                    if not await job.admitted:
                        continue
                except asyncio.CancelledError:
                    _fail_job(job, _shutting_down())
                    raise
                if self._closing:  # shutdown: nothing new starts (a reply to finish is left to its lease)
                    _fail_job(job, _shutting_down())
                    continue
                if job.stored.cancelled() or (job.receivable is not None and not job.receivable()):
                    # Its sender left and nobody else listens (socket), or its caller gave up (REST): storing and
                    # answering it would only spend provider calls nobody reads.
                    logger.info("session {}: dropped a waiting message: nobody is left to receive it", session_id)
                    _fail_job(job, ApiError("unavailable", "Nobody is listening to this conversation.", retry_after=1))
                    continue
                try:
                    async with self._turn(session_id):
                        if job.recover is not None:
                            await self._recover(session_id, job.recover)
                        else:
                            await self._process(session_id, job)
                except LockError:
                    _fail_job(job, ApiError("unavailable", "The conversation is busy; please retry.", retry_after=2))
                except asyncio.CancelledError:
                    _fail_job(job, _shutting_down())
                    raise
                except REDIS_DOWN:
                    logger.warning("session {}: storage unreachable while handling a message", session_id)
                    _fail_job(job, storage_unavailable())
                except Exception as err:
                    logger.exception("session {}: message handling failed", session_id)
                    _fail_job(job, err if isinstance(err, ApiError) else ApiError("internal", "Something went wrong."))
                finally:
                    if job.recover is not None:  # taken over but not finished here: let the lease run out again
                        self._leased.discard(session_id)
        finally:
            _refuse_waiting(queue)
            if self._queues.get(session_id) is queue:
                del self._queues[session_id]

    @contextlib.asynccontextmanager
    async def _turn(self, session_id: str) -> AsyncIterator[None]:
        """Across processes, hold the session's Redis lock (renewed) while one message is handled.

        With Redis unreachable, or writes still buffered, this process's own queue keeps the order: the lock
        is skipped rather than turning the outage into an error.
        """
        lock = self.sessions.session_lock(session_id) if self.cross_process_order and not self.store.depth else None
        acquired = False
        if lock is not None:
            try:
                acquired = bool(await lock.acquire(token=f"{self.instance_id}:{uuid.uuid4().hex}"))
            except REDIS_DOWN as err:
                logger.warning("session {}: lock unavailable (redis unreachable: {})", session_id, type(err).__name__)
                lock = None
            else:
                if not acquired:
                    raise LockError("the session stayed locked")
        keeper = asyncio.create_task(_keep_lock(lock)) if lock is not None else None
        try:
            yield
        finally:
            if keeper is not None:
                keeper.cancel()
            if lock is not None and acquired:
                with contextlib.suppress(LockError, *REDIS_DOWN):
                    await lock.release()

    async def _process(self, session_id: str, job: _Job) -> None:
        user_message: dict[str, Any] = {
            "id": new_id(),
            "sessionId": session_id,
            "role": "user",
            "content": job.text,
            "createdAt": now_iso(),
        }
        if job.client_message_id:
            user_message["clientMessageId"] = job.client_message_id
        reply_id = new_id()
        started = time.perf_counter()
        self._leased.add(session_id)
        try:
            appended = await self.store.append(
                session_id,
                user_message,
                client_message_id=job.client_message_id,
                context_size=self.max_history,
                reply_id=reply_id,
            )
            self.metrics.redis_latency.observe(time.perf_counter() - started)
            if job.stored.done():  # its REST caller gave up while it waited: stored, answered for nobody but history
                job.stored = asyncio.get_running_loop().create_future()
            job.stored.set_result(appended.message)
            if not appended.duplicate:
                self.metrics.messages_in.inc()
            if appended.state == "agent" and not appended.duplicate and self.handoff is not None:
                await self.handoff.forward_customer_message(appended.message)
                job.done.set_result(TurnResult(session_id, appended.message, None, None))
                return
            if appended.orphan is not None and not appended.duplicate:
                # An earlier message's reply was never finished (its process died): answer that one first.
                await self._recover(session_id, appended.orphan)
                self._leased.add(session_id)
                lease = self.store.lease_for(reply_id)
                if lease is not None:
                    await self.sessions.lease(session_id, appended.message["id"], lease)
            if appended.duplicate:
                try:
                    reply = await self.sessions.find_reply(session_id, appended.message["id"])
                except REDIS_DOWN:
                    reply = None
                job.done.set_result(TurnResult(session_id, appended.message, reply, None, duplicate=True))
                return
            if self._over_budget(appended.session_tokens):
                result = await self._budget_exhausted(session_id, appended.message)
            else:
                result = await self._answer(session_id, appended.message, appended.context, job.listener, reply_id)
        finally:
            self._leased.discard(session_id)
        if not job.done.done():
            job.done.set_result(result)

    async def _recover(self, session_id: str, pending: dict[str, Any]) -> None:
        """Finish a reply whose process died: answer again, or after a failed second try, say a person follows up."""
        user_message_id = str(pending.get("replyTo", ""))
        try:
            found = await self.sessions.message_with_context(session_id, user_message_id, self.max_history)
            if found is None or await self.sessions.find_reply(session_id, user_message_id) is not None:
                await self.sessions.release_lease(session_id)
                return
            user_message, context = found
            reply_id = str(pending.get("replyId") or new_id())
            resume_at = int(pending.get("resumeIndex", -1)) + 1
            if int(pending.get("attempt", 2)) > RECOVERY_ATTEMPTS:
                outcome = _Outcome(text="", provider=None, failed=True, reasons=(INTERRUPTED_REASON,))
                await self._conclude(session_id, user_message, reply_id, outcome, time.perf_counter(), None)
                return
            await self._answer(session_id, user_message, context, None, reply_id, resume_at=resume_at)
        finally:
            self._leased.discard(session_id)

    async def _answer(
        self,
        session_id: str,
        user_message: dict[str, Any],
        context: list[dict[str, Any]],
        listener: ReplyListener | None,
        reply_id: str,
        *,
        resume_at: int | None = None,
    ) -> TurnResult:
        started = time.perf_counter()
        text = user_message["content"]
        # The prompt within MAX_PROMPT_TOKENS; then paid providers only when every token budget has room for it.
        fitted = self.budgets.fit(self.prompts.system_prompt(text), _turns(context), text)
        request = fitted.request
        paid = any(name != LOCAL_PROVIDER for name in self.chain.usable_names)
        admission = await self.budgets.admit(session_id, fitted.tokens) if paid else Admission(local_only=False)
        if self.log_content:
            logger.opt(lazy=True).debug(
                "session {}: provider request: system={!r} history={!r} message={!r}",
                lambda: session_id,
                lambda: request.system_prompt,
                lambda: [(t.role, t.content) for t in request.history],
                lambda: request.message,
            )
        else:
            logger.debug("session {}: provider request: {} history turns", session_id, len(request.history))
        stream = ReplyStream(
            session_id=session_id,
            message_id=reply_id,
            sessions=self.sessions,
            broadcaster=self.broadcaster,
            flush_ms=self.flush_ms,
            flush_chars=self.flush_chars,
            listener=listener,
            # Across processes a rejoin may land elsewhere and reads the text so far from Redis; in one process
            # it reads the live stream itself, and a Redis write before every chunk would buy nothing.
            snapshots=self.cross_process_order and not self.store.depth,
            # A reply taken over from a process that died goes on under the same id: its first chunk tells
            # clients to drop what the dead process had sent.
            first_index=resume_at or 0,
            reset_first=resume_at is not None,
        )
        self._streams[session_id] = stream
        await self._typing(session_id, True)
        try:
            try:
                outcome = await self._generate(session_id, request, stream, admission)
            except asyncio.CancelledError:
                if not self._closing:
                    raise
                # Shutdown's deadline: what was written is kept, marked incomplete, and a person follows up.
                logger.warning("session {}: reply cut by shutdown after {} characters", session_id, len(stream.text))
                outcome = _Outcome(
                    text=stream.text + _pending_text(stream),
                    provider=stream.provider,
                    failed=True,
                    reasons=(INTERRUPTED_REASON,),
                )
        finally:
            try:
                await stream.close()
                await self._typing(session_id, False)
            finally:
                if self._streams.get(session_id) is stream:
                    del self._streams[session_id]
        if outcome.provider not in (None, LOCAL_PROVIDER) and not outcome.tokens:
            # Stopped or cut mid-answer: the provider billed the prompt and what it wrote, but reported no usage.
            # Charge an estimate, or stop-generation would refund every reservation (a budget bypass).
            outcome.tokens = fitted.tokens + estimate_tokens(stream.text)
        await self.budgets.settle(admission, 0 if outcome.provider == LOCAL_PROVIDER else outcome.tokens)
        return await self._conclude(session_id, user_message, reply_id, outcome, started, stream)

    async def _conclude(
        self,
        session_id: str,
        user_message: dict[str, Any],
        reply_id: str,
        outcome: _Outcome,
        started: float,
        stream: ReplyStream | None,
    ) -> TurnResult:
        """Store the answer (or the failure note), tell the room, and escalate when the rules say so."""
        replies = self._reply_messages(session_id, user_message["id"], reply_id, outcome)
        escalation = self.rules.for_user_message(session_id, user_message["content"])
        if outcome.failed:
            cut = INTERRUPTED_REASON in outcome.reasons
            escalation = escalation or (
                self.rules.for_failure(session_id, INTERRUPTED_REASON) if cut else self.rules.for_failure(session_id)
            )
        elif not outcome.stopped:
            escalation = escalation or self.rules.for_reply(session_id, outcome.confidence)
        await self.store.finish_reply(
            session_id,
            replies,
            streamed_id=reply_id if stream is not None and stream.snapshot_saved else None,
            attempts=outcome.attempts,
            provider=outcome.provider,
            confidence=outcome.confidence,
            latency_ms=(time.perf_counter() - started) * 1000,
            tokens=outcome.tokens,
        )
        self.metrics.messages_out.inc(len(replies))
        for position, message in enumerate(replies):
            last = position == len(replies) - 1
            payload = {
                "sessionId": session_id,
                "message": message,
                "escalation": escalation.to_dict() if (last and escalation) else None,
            }
            await self.broadcaster.emit("message-received", payload, session_id)
            if stream is not None:
                await stream.notify("message", payload)
        if escalation is not None:
            await self._announce_escalation(escalation)
        logger.info(
            "session {}: answered by {} in {:.0f} ms ({} chunks{}{})",
            session_id,
            outcome.provider or "nobody",
            (time.perf_counter() - started) * 1000,
            stream.chunks_sent if stream is not None else 0,
            ", stopped" if outcome.stopped else "",
            f", escalated: {escalation.trigger}" if escalation else "",
        )
        return TurnResult(session_id, user_message, replies[-1], escalation.to_dict() if escalation else None)

    def _over_budget(self, session_tokens: int) -> bool:
        """Whether the session's own provider-token budget is spent (0 means no budget).

        Today's, the visitor's and the client address's budgets never stop answers: they leave the knowledge base
        answering (see Budgets.admit in `_answer`), so no visitor can switch the AI off for anyone else.
        """
        return self.budgets.session_spent(session_tokens)

    async def _budget_exhausted(self, session_id: str, user_message: dict[str, Any]) -> TurnResult:
        """No more AI for this one session: say so, and bring in a person."""
        message = {
            "id": new_id(),
            "sessionId": session_id,
            "role": "system",
            "content": BUDGET_MESSAGE,
            "createdAt": now_iso(),
            "replyTo": user_message["id"],
        }
        await self.store.append(session_id, message)
        await _soft(self.sessions.release_lease(session_id), "release a reply lease")
        escalation = self.rules.for_failure(session_id, "The AI token budget is used up.")
        payload = {"sessionId": session_id, "message": message, "escalation": escalation.to_dict()}
        await self.broadcaster.emit("message-received", payload, session_id)
        await self._announce_escalation(escalation)
        self.metrics.budget_limited.labels("session").inc()
        logger.info("session {}: token budget used up, escalated", session_id)
        return TurnResult(session_id, user_message, message, escalation.to_dict())

    async def _generate(
        self, session_id: str, request: ProviderRequest, stream: ReplyStream, admission: Admission | None = None
    ) -> _Outcome:
        """Run the chain in its own task so `stop-generation` can cancel exactly that."""
        task = asyncio.create_task(self._consume(request, stream, local_only=admission is not None and admission.local_only))
        generation = _Generation(task, stream.message_id)
        self._generating[session_id] = generation
        try:
            return await task
        except asyncio.CancelledError:
            if not generation.stop_requested or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            return _Outcome(text=stream.text + _pending_text(stream), provider=stream.provider, stopped=True)
        finally:
            if self._generating.get(session_id) is generation:
                del self._generating[session_id]

    async def _consume(self, request: ProviderRequest, stream: ReplyStream, *, local_only: bool = False) -> _Outcome:
        async with contextlib.aclosing(self.chain.stream(request, local_only=local_only)) as events:
            async for event in events:
                if isinstance(event, ChainDelta):
                    await stream.add(event.text, event.provider, event.reset)
                    await stream.pace()
                elif isinstance(event, ChainInterrupted):
                    await stream.interrupted(event.provider, event.reason)
                elif isinstance(event, ChainDone):
                    return _Outcome(
                        text=event.text,
                        provider=event.provider,
                        confidence=event.confidence,
                        tokens=event.input_tokens + event.output_tokens,
                        attempts=event.attempts,
                    )
                elif isinstance(event, ChainFailed):
                    await stream.close()
                    return _Outcome(
                        text=event.partial,
                        provider=stream.provider,
                        failed=True,
                        reasons=event.reasons,
                        attempts=event.attempts,
                    )
        raise RuntimeError("provider chain ended without an outcome")

    @staticmethod
    def _reply_messages(session_id: str, user_message_id: str, message_id: str, outcome: _Outcome) -> list[dict[str, Any]]:
        """The assistant reply, or on total failure the partial text (incomplete) and a system message."""
        messages: list[dict[str, Any]] = []
        if not outcome.failed or outcome.text:
            reply: dict[str, Any] = {
                "id": message_id,
                "sessionId": session_id,
                "role": "assistant",
                "content": outcome.text,
                "createdAt": now_iso(),
                "provider": outcome.provider,
                "confidence": None if outcome.confidence is None else round(outcome.confidence, 4),
                "replyTo": user_message_id,
            }
            if outcome.stopped:
                reply["stopped"] = True
            if outcome.failed:
                reply["incomplete"] = True
            messages.append(reply)
        if outcome.failed:
            messages.append(
                {
                    "id": new_id(),
                    "sessionId": session_id,
                    "role": "system",
                    "content": FAILURE_MESSAGE,
                    "createdAt": now_iso(),
                    "replyTo": user_message_id,
                }
            )
        return messages

    async def _announce_escalation(self, escalation: Escalation) -> None:
        body = escalation.to_dict()
        self.metrics.escalations.labels(escalation.trigger).inc()
        await self.broadcaster.emit("escalation-needed", body, escalation.session_id)
        logger.info("session {}: escalated ({}): {}", escalation.session_id, escalation.trigger, escalation.reason)
        # Kept, counted and queued for agents now, or (Redis unreachable) buffered with the messages, in order.
        await self.store.run_or_defer("escalation", escalation.session_id, body)

    async def _store_escalation(self, session_id: str, body: dict[str, Any]) -> None:
        """Keep an escalation with the session, count it, and bring in a person (queue or ticket)."""
        await self.sessions.record_escalation(session_id, body)
        if self.handoff is not None:
            await self.handoff.on_escalation(
                Escalation(session_id, body["trigger"], body["reason"], body.get("createdAt") or now_iso())
            )

    async def _typing(self, session_id: str, typing: bool) -> None:
        await self.broadcaster.emit("assistant-typing", {"sessionId": session_id, "typing": typing}, session_id)


def _turns(context: list[dict[str, Any]]) -> list[ChatTurn]:
    """Earlier messages as model turns: agents spoke for the store; system notes are not conversation."""
    turns: list[ChatTurn] = []
    for message in context:
        role = message.get("role")
        if role == "user":
            turns.append(ChatTurn("user", message.get("content", "")))
        elif role in ("assistant", "agent") and message.get("content"):
            turns.append(ChatTurn("assistant", message["content"]))
    return turns


async def _keep_lock(lock: Lock, every: float = 1.5) -> None:
    """Renew the session lock while its message is handled (its TTL only matters if we crash)."""
    while True:
        await asyncio.sleep(every)
        try:
            await lock.reacquire()
        except Exception as err:
            logger.warning("could not renew a session lock: {}", type(err).__name__)


async def _soft(step: Awaitable[Any], what: str) -> None:
    """Book-keeping that must not cost a reply when Redis is unreachable."""
    try:
        await step
    except REDIS_DOWN as err:
        logger.warning("could not {} (redis unreachable: {})", what, type(err).__name__)


def _pending_text(stream: ReplyStream) -> str:
    return stream._pending


def _ignore_result(future: asyncio.Future[Any]) -> None:
    """Nobody waits for a taken-over reply's futures: mark their outcome retrieved."""
    if not future.cancelled():
        future.exception()


def _refuse_waiting(queue: deque[_Job]) -> None:
    """Messages still waiting for their turn (never stored) are refused, so their clients retry."""
    while queue:
        job = queue.popleft()
        _fail_job(job, _shutting_down())
        if not job.admitted.done():
            job.admitted.set_result(False)


def _fail_job(job: _Job, err: BaseException) -> None:
    for future in (job.stored, job.done):
        if not future.done():
            future.set_exception(err)
            future.exception()  # mark retrieved: nobody may be waiting for the reply
