"""One turn: the visitor's message stored, then prompt -> provider chain -> reply stream -> storage -> announcement.

Three pieces, each with the collaborators of its own step: the `Responder` handles a turn (stores the message, then
answers it, hands it to the agent holding the session, or finishes a reply a dead process left), the `ReplyWriter`
writes one answer (prompt within budget, chain, stream; `stop` cancels exactly that), the `Finisher` stores what
the turn ends with, tells the room and escalates when the rules say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from server.ai.chain import LOCAL_PROVIDER, ChainDelta, ChainDone, ChainFailed, ChainInterrupted, ProviderChain
from server.ai.knowledge import KnowledgeEntry
from server.ai.providers.base import ChatTurn, ProviderRequest
from server.ai.retrieval import Retrieval, Retriever, Source
from server.chat.budgets import Admission, Budgets, estimate_tokens
from server.chat.citations import cite
from server.chat.escalation import Escalations
from server.chat.language import LanguageDetection
from server.chat.leases import RECOVERY_ATTEMPTS, ReplyLeases
from server.chat.mood_model import MoodModel, Scored, settled
from server.chat.prompt import PromptBuilder
from server.chat.reply_stream import ReplyListener, ReplyStream, ReplyStreams
from server.chat.translations import answer_in, offline_note
from server.chat.turns import Turn, TurnResult
from server.contract import InProgress, Message, SessionState, new_id, new_message, now_iso
from server.errors import ApiError
from server.ops.metrics import Metrics
from server.realtime.emitter import Emitter
from server.settings import ChatSettings
from server.storage.errors import STORAGE_DOWN, OverLimit
from server.storage.messages import BudgetCharge, BudgetSettlement, BudgetVerdict, MessageStore, Streaks
from server.storage.write_behind import WriteBehindStore

BUDGET_MESSAGE = (
    "I've reached the limit of what I can answer in this conversation. A member of our support team will follow up with you."
)
FAILURE_MESSAGE = "I'm sorry, I can't answer right now. A member of our support team will follow up with you shortly."
INTERRUPTED_REASON = "The reply could not be finished (the server answering it stopped)."


@dataclass(slots=True)
class Outcome:
    """How the answer to one message ended: its text and provider, or a failure, a stop, a cut."""

    text: str
    provider: str | None
    confidence: float | None = None
    failed: bool = False
    stopped: bool = False
    reasons: tuple[str, ...] = field(default_factory=tuple)
    tokens: int = 0
    attempts: tuple[tuple[str, bool], ...] = ()
    retrieval: Retrieval | None = None  # what the message retrieved
    listed: tuple[KnowledgeEntry, ...] | None = None  # what its prompt numbered [1], [2], ... (None: not known)
    sources: tuple[Source, ...] = ()  # the entries the answer used: the provider's own, else derived from its citations


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a new message's answer needs before the message is stored: its system prompt, and the budget charge the
    append makes for the paid call (None: no paid provider can answer, or the budgets could not be read)."""

    system_prompt: str
    paid: bool
    charge: BudgetCharge | None
    retrieval: Retrieval | None = None  # what the message retrieved: the prompt shows it, the local provider answers it
    language: str | None = None  # the message's language when detected confidently (recorded with the session)
    upset: Scored | None = None  # the model's classification, running beside the answer (SENTIMENT_MODEL=provider)


@dataclass(slots=True)
class _Generation:
    """A reply being written: the task `stop` cancels, and whether it was `stop` that did."""

    task: asyncio.Task[Outcome]
    stop_requested: bool = False


class Responder:
    """Handles one turn: stores the visitor's message, then answers it (or finishes an orphaned reply)."""

    def __init__(
        self,
        *,
        writer: ReplyWriter,
        finisher: Finisher,
        store: WriteBehindStore,
        messages: MessageStore,
        leases: ReplyLeases,
        metrics: Metrics,
        settings: ChatSettings,
    ) -> None:
        self._writer = writer
        self._finisher = finisher
        self._store = store
        self._messages = messages
        self._leases = leases
        self._metrics = metrics
        self._settings = settings

    async def handle(self, session_id: str, turn: Turn) -> None:
        """The turn queue's handler: a new message, or a reply to finish."""
        if turn.recover is not None:
            await self.recover(session_id, turn.recover)
        else:
            await self._process(session_id, turn)

    async def _process(self, session_id: str, turn: Turn) -> None:
        """Store the message (rate limit, lease and budget charge in the same step), then answer it, or hand it to the
        agent holding the session."""
        extra = {"clientMessageId": turn.client_message_id} if turn.client_message_id else {}
        user_message = new_message(session_id, "user", turn.text, **extra)
        reply_id = new_id()
        prepared = await self._writer.prepare(session_id, turn.text)
        started = time.perf_counter()
        self._leases.hold(session_id)
        try:
            try:
                appended = await self._store.append(
                    session_id,
                    user_message,
                    client_message_id=turn.client_message_id,
                    context_size=self._settings.max_history,
                    reply_id=reply_id,
                    rate_limit=self._settings.messages_per_minute,
                    budget=prepared.charge,
                    language=prepared.language,
                )
            except OverLimit as err:
                wait = err.retry_after
                raise ApiError("rate_limited", f"Too many messages; try again in {wait:.0f} s.", retry_after=wait) from None
            stored = appended.message
            self._metrics.redis_latency.observe(time.perf_counter() - started)
            if turn.stored.done():  # its REST caller gave up while it waited: stored, answered for nobody but history
                turn.stored = asyncio.get_running_loop().create_future()
            turn.stored.set_result(stored)
            if not appended.duplicate:
                self._metrics.messages_in.inc()
            if appended.state == SessionState.AGENT and not appended.duplicate:
                await self._finisher.hand_to_agent(stored)
                turn.done.set_result(TurnResult(session_id, stored, None, None))
                return
            if appended.orphan is not None and not appended.duplicate:
                # An earlier message's reply was never finished (its process died): answer that one first.
                await self.recover(session_id, appended.orphan)
                self._leases.hold(session_id)
                lease = self._store.lease_for(reply_id)
                if lease is not None:
                    await self._leases.renew(session_id, stored["id"], lease)
            if appended.duplicate:
                try:
                    reply = await self._messages.find_reply(session_id, stored["id"])
                except STORAGE_DOWN:
                    reply = None
                turn.done.set_result(TurnResult(session_id, stored, reply, None, duplicate=True))
                return
            if self._writer.over_budget(appended.session_tokens):
                result = await self._finisher.budget_spent(session_id, stored)
            else:
                admission = self._writer.admission(session_id, prepared, appended.budget)
                result = await self._writer.answer(
                    session_id,
                    stored,
                    appended.context,
                    turn.listener,
                    reply_id,
                    system_prompt=prepared.system_prompt,
                    retrieval=prepared.retrieval,
                    admission=admission,
                    language=prepared.language or appended.language or None,
                    upset=prepared.upset,
                )
        finally:
            self._leases.drop(session_id)
        if not turn.done.done():
            turn.done.set_result(result)

    async def recover(self, session_id: str, pending: dict[str, Any]) -> None:
        """Finish a reply whose process died: answer again, or after a failed second try, say a person follows up."""
        user_message_id = str(pending.get("replyTo", ""))
        try:
            found = await self._messages.message_with_context(session_id, user_message_id, self._settings.max_history)
            if found is None or await self._messages.find_reply(session_id, user_message_id) is not None:
                await self._leases.release(session_id)
                return
            user_message, context = found
            reply_id = str(pending.get("replyId") or new_id())
            resume_at = int(pending.get("resumeIndex", -1)) + 1
            if int(pending.get("attempt", 2)) > RECOVERY_ATTEMPTS:
                outcome = Outcome(text="", provider=None, failed=True, reasons=(INTERRUPTED_REASON,))
                await self._finisher.finish(session_id, user_message, reply_id, outcome, time.perf_counter(), None)
                return
            await self._writer.answer(session_id, user_message, context, None, reply_id, resume_at=resume_at)
        finally:
            self._leases.drop(session_id)


class ReplyWriter:
    """Writes one answer: the prompt within its budgets, the provider chain, the reply streamed as it comes."""

    def __init__(
        self,
        *,
        chain: ProviderChain,
        retriever: Retriever,
        prompts: PromptBuilder,
        budgets: Budgets,
        streams: ReplyStreams,
        store: WriteBehindStore,
        finisher: Finisher,
        settings: ChatSettings,
        languages: LanguageDetection | None = None,
        moods: MoodModel | None = None,
    ) -> None:
        self._chain = chain
        self._moods = moods
        self._languages = languages
        self._retriever = retriever
        self._prompts = prompts
        self._budgets = budgets
        self._streams = streams
        self._store = store
        self._finisher = finisher
        self._settings = settings
        self._generating: dict[str, _Generation] = {}
        self._live: dict[str, ReplyStream] = {}
        self.shutting_down = False  # set by the shutdown: a reply cancelled now was cut by its deadline, and is kept
        chain.paid_paused = lambda: budgets.degraded  # summaries make no paid call once degraded either

    @property
    def generating(self) -> list[str]:
        """Sessions with a reply being written in this process."""
        return list(self._generating)

    @property
    def provider_names(self) -> list[str]:
        """The providers that can answer now, in the chain's order."""
        return self._chain.usable_names

    def over_budget(self, session_tokens: int) -> bool:
        """Whether the session's own provider-token budget is spent (0 means no budget).

        Today's, the visitor's and the client address's budgets never stop answers: they leave the knowledge base
        answering (see Budgets.admit in `answer`), so no visitor can switch the AI off for anyone else.
        """
        return self._budgets.session_spent(session_tokens)

    async def prepare(self, session_id: str, text: str) -> Prepared:
        """Before a new message is stored: its retrieval (once per message), system prompt and budget charge."""
        retrieval = await self._retriever.retrieve(text)
        system_prompt = self._prompts.system_prompt(retrieval)
        paid = self._paid()
        charge = await self._budgets.charge_for(session_id, system_prompt, text) if paid else None
        language = self._languages.detect(text) if self._languages is not None else None
        upset = self._moods.start(text) if self._moods is not None else None  # awaited by the Finisher only
        return Prepared(system_prompt, paid, charge, retrieval, language, upset)

    def admission(self, session_id: str, prepared: Prepared, verdict: BudgetVerdict | None) -> Admission | None:
        """What the append's charge allows (None: nothing was charged though a paid call may be made: `answer` does)."""
        if not prepared.paid:
            return Admission(local_only=False)
        if prepared.charge is None or verdict is None:
            return None
        return self._budgets.admitted(session_id, prepared.charge, verdict)

    def _paid(self) -> bool:
        """Whether a paid provider can answer now (the knowledge base alone is never charged)."""
        return any(name != LOCAL_PROVIDER for name in self._chain.usable_names)

    def writing(self, session_id: str) -> bool:
        """Whether this process is writing the session's reply."""
        return session_id in self._live

    def written(self, session_id: str) -> InProgress | None:
        """What the room has been sent so far of the reply this process is writing, if any."""
        stream = self._live.get(session_id)
        return None if stream is None else stream.written

    def stop(self, session_id: str) -> bool:
        """Cancel the reply being written (its HTTP stream closes); the partial text is kept."""
        generation = self._generating.get(session_id)
        if generation is None or generation.task.done():
            return False
        generation.stop_requested = True
        generation.task.cancel()
        return True

    async def answer(
        self,
        session_id: str,
        user_message: Message,
        context: list[Message],
        listener: ReplyListener | None,
        reply_id: str,
        *,
        resume_at: int | None = None,
        system_prompt: str | None = None,
        retrieval: Retrieval | None = None,
        admission: Admission | None = None,
        language: str | None = None,
        upset: Scored | None = None,
    ) -> TurnResult:
        """Answer one stored message; `resume_at`: a reply taken over from a dead process goes on from that chunk.

        `admission`: what the message's append charged (see `prepare`); without it the budgets are charged here.
        `language`: the session's language: models are told to answer in it, an offline answer starts with a note
        in it (the knowledge base answers in English; a person can help). `upset`: the message's classification
        by the model, started in `prepare`, for the Finisher.
        """
        started = time.perf_counter()
        text = user_message["content"]
        # The prompt within MAX_PROMPT_TOKENS; then paid providers only when every token budget has room for it.
        if retrieval is None or system_prompt is None:  # a reply taken over: retrieved again (cached, as a rule)
            retrieval = await self._retriever.retrieve(text)
            system_prompt = self._prompts.system_prompt(retrieval)
        instruction = answer_in(language)
        if instruction is not None:  # after the cached prompt, not in its key: one prompt per question still
            system_prompt = f"{system_prompt}\n\n{instruction}"
        fitted = self._budgets.fit(system_prompt, _turns(context), text)
        request = dataclasses.replace(fitted.request, retrieval=retrieval)
        if admission is None:
            paid = self._paid()
            admission = await self._budgets.admit(session_id, fitted.tokens) if paid else Admission(local_only=False)
        if self._settings.log_content:
            logger.opt(lazy=True).debug(
                "session {}: provider request: system={!r} history={!r} message={!r}",
                lambda: session_id,
                lambda: request.system_prompt,
                lambda: [(t.role, t.content) for t in request.history],
                lambda: request.message,
            )
        else:
            logger.debug("session {}: provider request: {} history turns", session_id, len(request.history))
        stream = self._streams.open(
            session_id,
            reply_id,
            listener=listener,
            # Across processes a rejoin may land elsewhere and reads the text so far from Redis; in one process
            # it reads the live stream itself, and a Redis write before every chunk would buy nothing.
            snapshots=self._settings.cross_process_order and not self._store.depth,
            resume_at=resume_at,
        )
        self._live[session_id] = stream
        await stream.begin()
        try:
            try:
                outcome = await self._generate(session_id, request, stream, admission, offline_note(language))
            except asyncio.CancelledError:
                if not self.shutting_down:
                    raise
                # Shutdown's deadline: what was written is kept, marked incomplete, and a person follows up.
                logger.warning("session {}: reply cut by shutdown after {} characters", session_id, len(stream.text))
                outcome = Outcome(
                    text=stream.text + stream.unsent,
                    provider=stream.provider,
                    failed=True,
                    reasons=(INTERRUPTED_REASON,),
                    retrieval=request.retrieval,
                )
        finally:
            try:
                await stream.end()
            finally:
                if self._live.get(session_id) is stream:
                    del self._live[session_id]
        if request.retrieval is not None:  # what a model may cite: see Finisher._cite
            outcome.listed = self._prompts.listed(request.retrieval)
        if outcome.provider not in (None, LOCAL_PROVIDER) and not outcome.tokens:
            # Stopped or cut mid-answer: the provider billed the prompt and what it wrote, but reported no usage.
            # Charge an estimate, or stop-generation would refund every reservation (a budget bypass).
            outcome.tokens = fitted.tokens + estimate_tokens(stream.text)
        settle = self._budgets.settlement(admission, 0 if outcome.provider == LOCAL_PROVIDER else outcome.tokens)
        return await self._finisher.finish(
            session_id, user_message, reply_id, outcome, started, stream, settle=settle, upset=upset
        )

    async def _generate(
        self, session_id: str, request: ProviderRequest, stream: ReplyStream, admission: Admission, note: str | None = None
    ) -> Outcome:
        """Run the chain in its own task so `stop-generation` can cancel exactly that."""
        task = asyncio.create_task(self._consume(request, stream, local_only=admission.local_only, note=note))
        generation = _Generation(task)
        self._generating[session_id] = generation
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not generation.stop_requested or (current is not None and current.cancelling()):
                raise
            return Outcome(text=stream.text + stream.unsent, provider=stream.provider, stopped=True, retrieval=request.retrieval)
        finally:
            if self._generating.get(session_id) is generation:
                del self._generating[session_id]

    async def _consume(
        self, request: ProviderRequest, stream: ReplyStream, *, local_only: bool, note: str | None = None
    ) -> Outcome:
        """The chain's events onto the stream; `note` starts an answer of the offline provider (see `answer`)."""
        noted = False
        async with contextlib.aclosing(self._chain.stream(request, local_only=local_only)) as events:
            async for event in events:
                if isinstance(event, ChainDelta):
                    delta = event.text
                    if event.reset:
                        noted = False
                    if note is not None and event.provider == LOCAL_PROVIDER and not noted:
                        delta, noted = f"{note}\n\n{delta}", True
                    await stream.add(delta, event.provider, event.reset)
                    await stream.pace()
                elif isinstance(event, ChainInterrupted):
                    await stream.interrupted(event.provider, event.reason)
                elif isinstance(event, ChainDone):
                    noted_text = note is not None and event.provider == LOCAL_PROVIDER
                    return Outcome(
                        text=f"{note}\n\n{event.text}" if noted_text else event.text,
                        provider=event.provider,
                        confidence=event.confidence,
                        tokens=event.input_tokens + event.output_tokens,
                        attempts=event.attempts,
                        retrieval=request.retrieval,
                        sources=event.sources,
                    )
                elif isinstance(event, ChainFailed):
                    await stream.close()
                    return Outcome(
                        text=event.partial,
                        provider=stream.provider,
                        failed=True,
                        reasons=event.reasons,
                        attempts=event.attempts,
                        retrieval=request.retrieval,
                    )
        raise RuntimeError("provider chain ended without an outcome")


class Finisher:
    """The end of a turn: its closing messages stored, sent to the room, and any escalation announced."""

    def __init__(
        self, *, store: WriteBehindStore, emitter: Emitter, escalations: Escalations, leases: ReplyLeases, metrics: Metrics
    ) -> None:
        self._store = store
        self._emitter = emitter
        self._escalations = escalations
        self._leases = leases
        self._metrics = metrics

    async def finish(
        self,
        session_id: str,
        user_message: Message,
        reply_id: str,
        outcome: Outcome,
        started: float,
        stream: ReplyStream | None,
        *,
        settle: BudgetSettlement | None = None,
        upset: Scored | None = None,
    ) -> TurnResult:
        """Store the answer (or the failure note) with its budget settlement, tell the room, escalate if the rules say so.

        `upset`: the model's classification of the message, awaited here only (bounded by its own timeout), only
        when no other trigger escalated already; without a score the lexicon decides.
        """
        self._cite(session_id, outcome)
        replies = _reply_messages(session_id, user_message["id"], reply_id, outcome)
        rules = self._escalations.rules
        escalation = rules.for_user_message(session_id, user_message["content"])
        if outcome.failed:
            cut = INTERRUPTED_REASON in outcome.reasons
            escalation = escalation or (
                rules.for_failure(session_id, INTERRUPTED_REASON) if cut else rules.for_failure(session_id)
            )
        answered = not outcome.failed and not outcome.stopped
        verdict = outcome.retrieval.verdict if outcome.retrieval is not None else None
        signals = rules.signals(user_message["content"], outcome.confidence, verdict) if answered else None
        stored = await self._store.finish_reply(
            session_id,
            replies,
            streamed_id=reply_id if stream is not None and stream.snapshot_saved else None,
            attempts=outcome.attempts,
            provider=outcome.provider,
            confidence=outcome.confidence,
            latency_ms=(time.perf_counter() - started) * 1000,
            tokens=outcome.tokens,
            settle=settle,
            # the session's misses and negative messages in a row move in the same round trip (no extra one)
            streaks=None
            if signals is None
            else Streaks(signals.miss, signals.negative, rules.misses_in_a_row, rules.negatives_in_a_row),
        )
        if stored.used is not None:
            self._metrics.tokens_today.set(stored.used)
        if signals is not None:
            score = await settled(upset) if escalation is None else None
            escalation = (
                escalation
                or rules.for_sentiment(session_id, signals.mood, stored.negatives, score)
                or rules.for_reply(session_id, outcome.confidence, misses=stored.misses, verdict=verdict)
            )
        self._metrics.messages_out.inc(len(replies))
        record = escalation.to_dict() if escalation is not None else None
        for message in replies[:-1]:
            await self._emitter.message_received(message)
        await self._emitter.message_received(replies[-1], record)
        if escalation is not None:
            await self._escalations.announce(escalation)
        logger.info(
            "session {}: answered by {} in {:.0f} ms ({} chunks{}{})",
            session_id,
            outcome.provider or "nobody",
            (time.perf_counter() - started) * 1000,
            stream.chunks_sent if stream is not None else 0,
            ", stopped" if outcome.stopped else "",
            f", escalated: {escalation.trigger}" if escalation else "",
        )
        return TurnResult(session_id, user_message, replies[-1], record)

    def _cite(self, session_id: str, outcome: Outcome) -> None:
        """The answer's sources from its citations; one of an entry its prompt never listed is dropped and counted."""
        if not outcome.text:
            return
        cited = cite(outcome.text, outcome.listed, outcome.sources)
        if cited.unknown:
            logger.warning(
                "session {}: {} cited {} not among the {} entries of its prompt: dropped",
                session_id,
                outcome.provider,
                ", ".join(f"[{n}]" for n in cited.unknown),
                len(outcome.listed or ()),
            )
            self._metrics.child(self._metrics.citations_dropped, outcome.provider or "unknown").inc(len(cited.unknown))
        outcome.text, outcome.sources = cited.text, cited.sources

    async def budget_spent(self, session_id: str, user_message: Message) -> TurnResult:
        """No more AI for this one session: say so, and bring in a person."""
        message = new_message(session_id, "system", BUDGET_MESSAGE, replyTo=user_message["id"])
        await self._store.append(session_id, message)
        try:
            await self._leases.release(session_id)
        except STORAGE_DOWN as err:  # book-keeping that must not cost the answer
            logger.warning("could not release a reply lease (redis unreachable: {})", type(err).__name__)
        escalation = self._escalations.rules.for_failure(session_id, "The AI token budget is used up.")
        record = escalation.to_dict()
        await self._emitter.message_received(message, record)
        await self._escalations.announce(escalation)
        self._metrics.child(self._metrics.budget_limited, "session").inc()
        logger.info("session {}: token budget used up, escalated", session_id)
        return TurnResult(session_id, user_message, message, record)

    async def hand_to_agent(self, message: Message) -> None:
        """While an agent holds the session, the visitor's messages go to the agent, not the AI."""
        await self._emitter.message_to_agents(message)


def _reply_messages(session_id: str, user_message_id: str, message_id: str, outcome: Outcome) -> list[Message]:
    """The assistant reply, or on total failure the partial text (incomplete) and a system message."""
    messages: list[Message] = []
    if not outcome.failed or outcome.text:
        reply: Message = {
            "id": message_id,
            "sessionId": session_id,
            "role": "assistant",
            "content": outcome.text,
            "createdAt": now_iso(),
            "provider": outcome.provider,
            "confidence": None if outcome.confidence is None else round(outcome.confidence, 4),
            "replyTo": user_message_id,
            "sources": [source.to_dict() for source in outcome.sources],
        }
        if outcome.stopped:
            reply["stopped"] = True
        if outcome.failed:
            reply["incomplete"] = True
        messages.append(reply)
    if outcome.failed:
        messages.append(new_message(session_id, "system", FAILURE_MESSAGE, replyTo=user_message_id))
    return messages


def _turns(context: list[Message]) -> list[ChatTurn]:
    """Earlier messages as model turns: agents spoke for the store; system notes are not conversation."""
    turns: list[ChatTurn] = []
    for message in context:
        role = message.get("role")
        if role == "user":
            turns.append(ChatTurn("user", message.get("content", "")))
        elif role in ("assistant", "agent") and message.get("content"):
            turns.append(ChatTurn("assistant", message["content"]))
    return turns
