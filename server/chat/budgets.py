"""Token budgets no one visitor can spend, and a prompt that fits its token cap.

Every paid provider call is charged, before it is made, to three counters for the UTC day: everyone's, the
visitor's (userId) and the client address's, in one Lua step, so the limits hold across processes and concurrent
calls: a call is made only when its reservation fits every counter. The reservation is the prompt's estimated size
plus REPLY_RESERVE_TOKENS; once the provider reports its usage, the counters are corrected by the difference. On
the hot path both ride on the turn's two writes: the charge in the message's append (`charge_for`, then
`admitted`; the script counts the prompt as fit_prompt does) and the correction in the reply's finish_reply
(`settlement`); a reply written without that append (taken over from a dead process, or its message buffered
through a Redis outage) is charged and settled on its own (`admit`, `settle`). A visitor or address over its
budget, and everyone once today's total reaches TOKEN_BUDGET_DEGRADE_AT of TOKEN_BUDGET_PER_DAY, is answered by
the local knowledge base only: never switched off. The per-session budget keeps its old meaning (the budget
message and a person).

Token counts are estimated, not tokenized: no maintained tokenizer ships its vocabulary offline (tiktoken's
wheel downloads its BPE files at run time, and Gemini's tokenizer is a network call), so a text counts as its
UTF-8 bytes / 3, rounded up, plus TURN_OVERHEAD_TOKENS. English runs at about 4 bytes per token in GPT and Gemini
vocabularies and CJK at about 3, so the estimate is on the high side for natural text; budgets themselves are
charged with the provider's own count.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger

from server.ai.providers.base import ChatTurn, ProviderRequest
from server.ops.metrics import Metrics
from server.storage.errors import STORAGE_DOWN
from server.storage.keys import utc_day
from server.storage.messages import BudgetCharge, BudgetSettlement, BudgetVerdict
from server.storage.rate_limits import RateLimitStore
from server.storage.sessions import SessionStore

if TYPE_CHECKING:
    from server.settings import Settings

BYTES_PER_TOKEN = 3
TURN_OVERHEAD_TOKENS = 4  # role markers and separators around each message
REPLY_RESERVE_TOKENS = 800  # reserved for the answer of each paid call, until the provider reports its usage
COUNTER_TTL_SECONDS = 2 * 86_400  # a day's counters (and its address salt) outlive midnight by a day
MIN_MESSAGE_BYTES = 200  # a message is never cut below this, even when the system prompt leaves no room
SCOPES = ("day", "visitor", "ip")  # in the order of the counters charged
OWNERS_KEPT = 20_000  # sessions whose counter names are remembered


def estimate_tokens(text: str) -> int:
    """A cautious token count for one message: UTF-8 bytes / 3, rounded up, plus the per-message overhead."""
    return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN) + TURN_OVERHEAD_TOKENS


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """The budgets and the prompt cap, from settings (0 means no limit)."""

    per_session: int = 200_000
    per_day: int = 5_000_000
    per_visitor: int = 250_000
    per_ip: int = 1_000_000
    degrade_at: float = 0.8
    max_prompt_tokens: int = 3000
    reply_reserve: int = REPLY_RESERVE_TOKENS

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetPolicy:
        """The policy the operator configured."""
        return cls(
            per_session=settings.token_budget_per_session,
            per_day=settings.token_budget_per_day,
            per_visitor=settings.token_budget_per_visitor,
            per_ip=settings.token_budget_per_ip,
            degrade_at=settings.token_budget_degrade_at,
            max_prompt_tokens=settings.max_prompt_tokens,
        )

    @property
    def degrade_threshold(self) -> int:
        """Today's total from which everyone is answered by the knowledge base (0: never)."""
        if self.per_day <= 0:
            return 0
        return max(1, int(self.per_day * min(1.0, max(0.0, self.degrade_at))))


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    """A provider request within the prompt cap, and what had to go to get it there."""

    request: ProviderRequest
    tokens: int
    dropped_turns: int = 0
    truncated: bool = False


def fit_prompt(system_prompt: str, history: Sequence[ChatTurn], message: str, max_tokens: int) -> FittedPrompt:
    """Drop the oldest turns (then cut the message's end) until system prompt + history + message fit the cap.

    The history sent never starts with an assistant turn. The system prompt is never cut: the cap assumes it
    fits well within it (a message is kept to at least MIN_MESSAGE_BYTES whatever the prompt's size). append.lua's
    prompt_tokens (budget_charge.lua) counts the same way, so a budget is charged what this sends.
    """
    turns = list(history)
    costs = [estimate_tokens(t.content) for t in turns]
    fixed = estimate_tokens(system_prompt) + estimate_tokens(message)
    total = fixed + sum(costs)
    if max_tokens <= 0 or total <= max_tokens:
        return FittedPrompt(ProviderRequest(system_prompt, turns, message), total)
    drop = 0
    while drop < len(turns) and (total > max_tokens or turns[drop].role != "user"):
        total -= costs[drop]
        drop += 1
    truncated = False
    if total > max_tokens:
        message, total = cut_message(system_prompt, message, max_tokens)
        truncated = True
    return FittedPrompt(ProviderRequest(system_prompt, turns[drop:], message), total, drop, truncated)


def cut_message(system_prompt: str, message: str, max_tokens: int) -> tuple[str, int]:
    """The message cut to what the cap leaves beside the system prompt (at least MIN_MESSAGE_BYTES), and the total."""
    room = (max_tokens - estimate_tokens(system_prompt) - TURN_OVERHEAD_TOKENS) * BYTES_PER_TOKEN
    message = message.encode("utf-8")[: max(MIN_MESSAGE_BYTES, room)].decode("utf-8", "ignore")
    return message, estimate_tokens(system_prompt) + estimate_tokens(message)


@dataclass(frozen=True, slots=True)
class Admission:
    """What one message may spend: paid providers (with the tokens reserved for it) or the knowledge base only."""

    local_only: bool
    scope: str | None = None  # the budget that ruled paid providers out: day, visitor or ip
    keys: tuple[str, ...] = ()
    reserved: int = 0


class Budgets:
    """Charges provider tokens to today's global, visitor and client-address counters; degrades, never stops."""

    def __init__(self, limits: RateLimitStore, sessions: SessionStore, policy: BudgetPolicy, metrics: Metrics) -> None:
        self.limits = limits
        self.sessions = sessions
        self.policy = policy
        self.metrics = metrics
        self._salt: tuple[str, str] | None = None  # (day, salt) for client-address counter names
        self._owners: OrderedDict[tuple[str, str], tuple[tuple[str, int], ...]] = OrderedDict()  # see _counters
        self.degraded = False  # as today's last check in this process found: everyone on the knowledge base

    def session_spent(self, session_tokens: int) -> bool:
        """Whether the session used up its own budget (the budget message and a person, as before)."""
        return 0 < self.policy.per_session <= session_tokens

    def fit(self, system_prompt: str, history: Sequence[ChatTurn], message: str) -> FittedPrompt:
        """The request within MAX_PROMPT_TOKENS, counted in the metrics when something had to go."""
        fitted = fit_prompt(system_prompt, history, message, self.policy.max_prompt_tokens)
        if fitted.dropped_turns or fitted.truncated:
            self.metrics.prompt_trimmed.inc()
        return fitted

    async def charge_for(self, session_id: str, system_prompt: str, message: str) -> BudgetCharge | None:
        """What the message's append charges for the paid call answering it (None: Redis unreachable, charge later).

        The script counts the history's tokens itself from the context it returns; this gives it the rest.
        """
        day = utc_day()
        try:
            counters = await self._counters(session_id, day)
        except STORAGE_DOWN:
            return None
        fixed = estimate_tokens(system_prompt) + estimate_tokens(message)
        cap = self.policy.max_prompt_tokens
        truncated = cut_message(system_prompt, message, cap)[1] if 0 < cap < fixed else fixed
        return BudgetCharge(
            counters=tuple(key for key, _ in counters),
            limits=tuple(limit for _, limit in counters),
            reserve=self.policy.reply_reserve,
            ttl_seconds=COUNTER_TTL_SECONDS,
            fixed=fixed,
            cap=cap,
            truncated=truncated,
            session_budget=self.policy.per_session,
        )

    def admitted(self, session_id: str, charge: BudgetCharge, verdict: BudgetVerdict) -> Admission:
        """The admission the append's charge amounts to (metrics and the once-a-day log line as `admit`)."""
        counters = list(zip(charge.counters, charge.limits, strict=True))
        return self._verdict(session_id, counters, verdict.refused, verdict.used, verdict.first, verdict.reserved)

    async def admit(self, session_id: str, prompt_tokens: int) -> Admission:
        """Reserve a paid call's tokens on every counter, or say which budget leaves only the knowledge base.

        For a reply whose message's append did not charge it. Fails open while Redis is unreachable (as the rate
        limits do): an outage must not stop answers.
        """
        reserve = prompt_tokens + self.policy.reply_reserve
        day = utc_day()
        try:
            counters = await self._counters(session_id, day)
            refused, used, first = await self.limits.charge_budgets(counters, reserve, COUNTER_TTL_SECONDS)
        except STORAGE_DOWN as err:
            logger.warning("session {}: token budgets not checked (redis unreachable: {})", session_id, type(err).__name__)
            return Admission(local_only=False)
        return self._verdict(session_id, counters, refused, used, first, reserve)

    def _verdict(
        self, session_id: str, counters: Sequence[tuple[str, int]], refused: int, used: int, first: bool, reserve: int
    ) -> Admission:
        """Count a charge's outcome: paid providers with the reservation, or the budget that leaves the knowledge base."""
        self.metrics.tokens_today.set(used)
        degraded = refused == 1
        if degraded != self.degraded:
            self.degraded = degraded
            self.metrics.budget_degraded.set(1 if degraded else 0)
        if refused == 0:
            return Admission(False, None, tuple(key for key, limit in counters if limit >= 0), reserve)
        scope = SCOPES[refused - 1]
        self.metrics.child(self.metrics.budget_limited, scope).inc()
        if first and scope == "day":
            logger.warning(
                "token budget: {} of {} tokens used today (degrade at {:.0%}): everyone is answered from the "
                "knowledge base until midnight UTC",
                used,
                self.policy.per_day,
                self.policy.degrade_at,
            )
        elif first:
            logger.warning(
                "token budget: a {} budget is spent (session {}): its conversations are answered from the "
                "knowledge base until midnight UTC",
                scope,
                session_id,
            )
        return Admission(True, scope)

    def settlement(self, admission: Admission, tokens_used: int) -> BudgetSettlement | None:
        """A call's reservation replaced by what the provider reported using (0 when it was never made); None: none."""
        difference = tokens_used - admission.reserved
        if not admission.keys or difference == 0:
            return None
        return BudgetSettlement(admission.keys, difference, COUNTER_TTL_SECONDS)

    async def settle(self, admission: Admission, tokens_used: int) -> None:
        """Settle a reservation on its own (the hot path settles in the reply's finish_reply instead)."""
        settlement = self.settlement(admission, tokens_used)
        if settlement is None:
            return
        try:
            used = await self.limits.settle_budgets(settlement.counters, settlement.difference, COUNTER_TTL_SECONDS)
        except STORAGE_DOWN as err:
            logger.warning("could not settle a token reservation (redis unreachable: {})", type(err).__name__)
            return
        self.metrics.tokens_today.set(used)

    async def _counters(self, session_id: str, day: str) -> tuple[tuple[str, int], ...]:
        """The (key, limit) of every counter a paid call of the session is charged to, global first (cached, bounded).

        A session's visitor and address never change, so they are read once a day per session instead of before
        every paid call (a round trip in profiles).
        """
        key = (session_id, day)
        counters = self._owners.get(key)
        if counters is not None:
            self._owners.move_to_end(key)
            return counters
        visitor, address = await self._owners_of(session_id, day)
        counters = (
            (self.limits.budget_key(day), self.policy.degrade_threshold),
            (self.limits.budget_key(day, "visitor", visitor or "-"), self._limit(visitor, "visitor")),
            (self.limits.budget_key(day, "ip", address or "-"), self._limit(address, "ip")),
        )
        self._owners[key] = counters
        if len(self._owners) > OWNERS_KEPT:
            self._owners.popitem(last=False)
        return counters

    def _limit(self, owner: str, scope: str) -> int:
        """The counter's limit for the script: -1 when there is nobody to charge."""
        if not owner:
            return -1
        return self.policy.per_visitor if scope == "visitor" else self.policy.per_ip

    async def _owners_of(self, session_id: str, day: str) -> tuple[str, str]:
        """The session's visitor and client-address counter names for `day`."""
        fields = await self.sessions.fields(session_id, "userId", "clientIp")
        user_id, client_ip = fields.get("userId"), fields.get("clientIp")
        visitor = hashlib.sha256(user_id.encode()).hexdigest()[:32] if user_id else ""
        address = await self._address(day, client_ip) if client_ip else ""
        return visitor, address

    async def _address(self, day: str, client_ip: str) -> str:
        """The client address as a counter name: keyed with the day's salt, so it can't be read back later."""
        if self._salt is None or self._salt[0] != day:
            self._salt = (day, await self.limits.budget_salt(day, COUNTER_TTL_SECONDS))
        return hmac.new(self._salt[1].encode(), client_ip.encode(), hashlib.sha256).hexdigest()[:32]
