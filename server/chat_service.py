"""ChatService: turns a visitor's message into a stored, streamed, possibly escalated answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from server.errors import ApiError
from server.escalation import Escalation, EscalationRules
from server.handoff import HandoffService
from server.metrics import Metrics
from server.prompt import PromptBuilder
from server.provider_chain import ChainDelta, ChainDone, ChainFailed, ChainInterrupted, ProviderChain
from server.providers.base import ChatTurn, ProviderRequest
from server.reply_stream import Broadcaster, ReplyListener, ReplyStream
from server.sessions import SessionManager, new_id, now_iso
from server.write_behind import REDIS_DOWN, WriteBehindStore

BUDGET_MESSAGE = (
    "I've reached the limit of what I can answer in this conversation. "
    "A member of our support team will follow up with you."
)
FAILURE_MESSAGE = (
    "I'm sorry, I can't answer right now. A member of our support team will follow up with you shortly."
)


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
    text: str
    client_message_id: str | None
    listener: ReplyListener | None
    stored: asyncio.Future[dict[str, Any]]
    done: asyncio.Future[TurnResult]


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
        token_budget_per_session: int = 0,
        token_budget_per_day: int = 0,
        metrics: Metrics | None = None,
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
        self.token_budget_per_session = token_budget_per_session
        self.token_budget_per_day = token_budget_per_day
        self.metrics = metrics or Metrics()
        self._queues: dict[str, deque[_Job]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._generating: dict[str, _Generation] = {}
        self._streams: dict[str, ReplyStream] = {}

    # Entry points -----------------------------------------------------------------------
    async def submit(
        self,
        session_id: str,
        text: str,
        client_message_id: str | None = None,
        listener: ReplyListener | None = None,
    ) -> tuple[dict[str, Any], asyncio.Future[TurnResult]]:
        """Queue a message behind the session's earlier ones; returns once it is stored, with the reply's future."""
        loop = asyncio.get_running_loop()
        job = _Job(text, client_message_id, listener, loop.create_future(), loop.create_future())
        queue = self._queues.get(session_id)
        if queue is None:
            queue = self._queues[session_id] = deque()
            worker = asyncio.create_task(self._drain(session_id, queue), name=f"session-{session_id}")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        queue.append(job)
        return await job.stored, job.done

    async def escalate(self, session_id: str, reason: str | None) -> dict[str, Any]:
        """The visitor asked for a person."""
        escalation = self.rules.for_user_request(session_id, reason)
        await self._announce_escalation(escalation)
        return escalation.to_dict()

    def stop(self, session_id: str) -> bool:
        """Cancel the reply being written (its HTTP stream closes); the partial text is kept."""
        generation = self._generating.get(session_id)
        if generation is None or generation.task.done():
            return False
        generation.stop_requested = True
        generation.task.cancel()
        return True

    async def in_progress(self, session_id: str, history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """The reply still being written, for a rejoining client; None once it is in the history."""
        live = self._streams.get(session_id)
        if live is not None:
            return live.written
        if not self.cross_process_order:  # one process: no reply is being written anywhere else
            return None
        snapshot = await self.sessions.in_flight(session_id)
        if snapshot is None or any(m.get("id") == snapshot["messageId"] for m in history):
            return None
        return {"messageId": snapshot["messageId"], "text": snapshot["text"], "index": snapshot["index"]}

    @property
    def busy_sessions(self) -> int:
        """Sessions with a message being handled in this process."""
        return len(self._queues)

    async def drain(self, timeout: float) -> None:
        """Let replies in progress finish (bounded), then cancel what is left."""
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # The per-session worker -------------------------------------------------------------
    async def _drain(self, session_id: str, queue: deque[_Job]) -> None:
        try:
            while queue:
                job = queue.popleft()
                try:
                    if self.cross_process_order and not self.store.depth:
                        async with self.sessions.session_lock(session_id) as lock:
                            keeper = asyncio.create_task(_keep_lock(lock))
                            try:
                                await self._process(session_id, job)
                            finally:
                                keeper.cancel()
                    else:
                        await self._process(session_id, job)
                except LockError:
                    _fail_job(job, ApiError("unavailable", "The conversation is busy; please retry."))
                except asyncio.CancelledError:
                    _fail_job(job, ApiError("unavailable", "The server is shutting down; please retry."))
                    raise
                except Exception as err:
                    logger.exception("session {}: message handling failed", session_id)
                    _fail_job(job, err if isinstance(err, ApiError) else ApiError("internal", "Something went wrong."))
        finally:
            while queue:
                _fail_job(queue.popleft(), ApiError("unavailable", "The server is shutting down; please retry."))
            if self._queues.get(session_id) is queue:
                del self._queues[session_id]

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
        started = time.perf_counter()
        appended = await self.store.append(
            session_id, user_message, client_message_id=job.client_message_id, context_size=self.max_history
        )
        self.metrics.redis_latency.observe(time.perf_counter() - started)
        job.stored.set_result(appended.message)
        if not appended.duplicate:
            self.metrics.messages_in.inc()
        if appended.state == "agent" and not appended.duplicate and self.handoff is not None:
            await self.handoff.forward_customer_message(appended.message)
            job.done.set_result(TurnResult(session_id, appended.message, None, None))
            return
        if appended.duplicate:
            reply = await self.sessions.find_reply(session_id, appended.message["id"])
            job.done.set_result(TurnResult(session_id, appended.message, reply, None, duplicate=True))
            return
        if self._over_budget(appended.session_tokens, appended.day_tokens):
            result = await self._budget_exhausted(session_id, appended.message)
        else:
            result = await self._answer(session_id, appended.message, appended.context, job.listener)
        if not job.done.done():
            job.done.set_result(result)

    async def _answer(
        self,
        session_id: str,
        user_message: dict[str, Any],
        context: list[dict[str, Any]],
        listener: ReplyListener | None,
    ) -> TurnResult:
        started = time.perf_counter()
        text = user_message["content"]
        request = ProviderRequest(
            system_prompt=self.prompts.system_prompt(text), history=_turns(context), message=text
        )
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
            message_id=new_id(),
            sessions=self.sessions,
            broadcaster=self.broadcaster,
            flush_ms=self.flush_ms,
            flush_chars=self.flush_chars,
            listener=listener,
            # Across processes a rejoin may land elsewhere and reads the text so far from Redis; in one process
            # it reads the live stream itself, and a Redis write before every chunk would buy nothing.
            snapshots=self.cross_process_order,
        )
        self._streams[session_id] = stream
        await self._typing(session_id, True)
        try:
            outcome = await self._generate(session_id, request, stream)
        finally:
            try:
                await stream.close()
                await self._typing(session_id, False)
            finally:
                if self._streams.get(session_id) is stream:
                    del self._streams[session_id]

        replies = self._reply_messages(session_id, user_message["id"], stream.message_id, outcome)
        escalation = self.rules.for_user_message(session_id, text)
        if outcome.failed:
            escalation = escalation or self.rules.for_failure(session_id)
        elif not outcome.stopped:
            escalation = escalation or self.rules.for_reply(session_id, outcome.confidence)
        await self.store.finish_reply(
            session_id,
            replies,
            streamed_id=stream.message_id if stream.snapshot_saved else None,
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
            await stream.notify("message", payload)
        if escalation is not None:
            await self._announce_escalation(escalation)
        logger.info(
            "session {}: answered by {} in {:.0f} ms ({} chunks{}{})",
            session_id,
            outcome.provider or "nobody",
            (time.perf_counter() - started) * 1000,
            stream.chunks_sent,
            ", stopped" if outcome.stopped else "",
            f", escalated: {escalation.trigger}" if escalation else "",
        )
        return TurnResult(session_id, user_message, replies[-1], escalation.to_dict() if escalation else None)

    def _over_budget(self, session_tokens: int, day_tokens: int) -> bool:
        """Whether the session's or today's provider-token budget is spent (0 means no budget)."""
        return (0 < self.token_budget_per_session <= session_tokens) or (0 < self.token_budget_per_day <= day_tokens)

    async def _budget_exhausted(self, session_id: str, user_message: dict[str, Any]) -> TurnResult:
        """No more AI for this session (or today): say so, and bring in a person."""
        message = {
            "id": new_id(),
            "sessionId": session_id,
            "role": "system",
            "content": BUDGET_MESSAGE,
            "createdAt": now_iso(),
            "replyTo": user_message["id"],
        }
        await self.store.append(session_id, message)
        escalation = self.rules.for_failure(session_id, "The AI token budget is used up.")
        payload = {"sessionId": session_id, "message": message, "escalation": escalation.to_dict()}
        await self.broadcaster.emit("message-received", payload, session_id)
        await self._announce_escalation(escalation)
        logger.info("session {}: token budget used up, escalated", session_id)
        return TurnResult(session_id, user_message, message, escalation.to_dict())

    async def _generate(self, session_id: str, request: ProviderRequest, stream: ReplyStream) -> _Outcome:
        """Run the chain in its own task so `stop-generation` can cancel exactly that."""
        task = asyncio.create_task(self._consume(request, stream))
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

    async def _consume(self, request: ProviderRequest, stream: ReplyStream) -> _Outcome:
        async with contextlib.aclosing(self.chain.stream(request)) as events:
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
    def _reply_messages(
        session_id: str, user_message_id: str, message_id: str, outcome: _Outcome
    ) -> list[dict[str, Any]]:
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
        await _soft(self.sessions.count_escalation(escalation.session_id, escalation.trigger), "count an escalation")
        await _soft(self.sessions.record_escalation(escalation.session_id, body), "record an escalation")
        await self.broadcaster.emit("escalation-needed", body, escalation.session_id)
        logger.info("session {}: escalated ({}): {}", escalation.session_id, escalation.trigger, escalation.reason)
        if self.handoff is not None:
            await _soft(self.handoff.on_escalation(escalation), "queue an escalation for agents")

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


async def _keep_lock(lock: Lock, every: float = 3.0) -> None:
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


def _fail_job(job: _Job, err: BaseException) -> None:
    for future in (job.stored, job.done):
        if not future.done():
            future.set_exception(err)
            future.exception()  # mark retrieved: nobody may be waiting for the reply
