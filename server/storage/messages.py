"""Messages: a session's history (append, pages, lookups), finished replies, replies in flight and their leases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import LockNotOwnedError, ResponseError

from server.contract import Message, now_iso
from server.storage import keys, scripts
from server.storage.analytics import latency_bucket
from server.storage.errors import MessageUnknown, OverLimit, SessionGone
from server.storage.keys import RateBucket

LOCK_POLL_SECONDS = 0.1  # how often a turn waiting for its session's lock tries again (as redis-py's Lock)
RATE_WINDOW_MS = 60_000  # the messages-per-session limit counts per minute, as every fixed-window limit does


@dataclass(frozen=True, slots=True)
class BudgetCharge:
    """The token budgets a paid reply is charged to as its message is stored (see budget_charge.lua).

    The prompt's tokens are counted by the script from the context it returns, as fit_prompt counts them:
    `fixed` is the system prompt and the message, `truncated` the count if the message has to be cut to `cap`.
    """

    counters: tuple[str, ...]  # global, visitor, client address
    limits: tuple[int, ...]  # each counter's limit (0: counted, no limit; -1: not this call's)
    reserve: int  # tokens reserved for the reply
    ttl_seconds: int
    fixed: int
    cap: int
    truncated: int
    session_budget: int  # the session's own budget: a session that spent it is charged nothing (0: none)


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    """What charging a reply's budgets did: charged (`refused` 0) or which counter refused (1-based)."""

    refused: int
    used: int  # today's global counter
    first: bool  # the first refusal of that counter today
    reserved: int  # tokens charged to every counter (nothing when refused)


@dataclass(frozen=True, slots=True)
class BudgetSettlement:
    """A reservation corrected by what the reply used: `difference` added to each counter it was charged to."""

    counters: tuple[str, ...]
    difference: int
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class Streaks:
    """What a reply does to the session's counts of things in a row (see finish_reply.lua): True one more, False
    start over, None untouched; a count that reaches its limit (0: none) is reported and starts over."""

    miss: bool | None = None  # an in-scope question the assistant could not answer
    negative: bool | None = None  # a visitor's message that reads negative
    misses_limit: int = 0
    negatives_limit: int = 0


@dataclass(frozen=True, slots=True)
class FinishedReply:
    """What storing a finished reply reports: today's global budget counter (None: nothing settled) and the
    session's counts in a row after this reply (None: not counted, or written later while Redis was away)."""

    used: int | None = None
    misses: int | None = None
    negatives: int | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What storing a message did: stored it now, or found the earlier one with the same clientMessageId."""

    message: Message
    duplicate: bool
    context: list[Message]
    state: str
    session_tokens: int = 0
    day_tokens: int = 0
    orphan: dict[str, Any] | None = None  # an earlier message's reply that nobody finished (see append.lua)
    budget: BudgetVerdict | None = None  # what the reply was charged when it was stored, None: nothing was
    language: str = ""  # the session's language after this message (ISO 639-1; '' none known)


@dataclass(frozen=True, slots=True)
class ReplyLease:
    """Who answers a stored message, and until when without renewing: a dead owner's reply is taken over."""

    owner: str
    reply_id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of history, oldest first."""

    messages: list[Message]
    has_more: bool


class MessageStore:
    """A session's messages in order, idempotent, trimmed to its cap; the reply being written and who writes it."""

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._shared = scripts.SharedConnection(redis)  # the hot path's two writes, pipelined on one connection
        self._append = scripts.register_hot(self._shared, "append", includes=("trim_history", "budget_charge"))
        self._finish = scripts.register_hot(self._shared, "finish_reply", includes=("trim_history", "budget_charge"))
        self._lock_script = scripts.register_hot(self._shared, "session_lock")
        self._snapshots = SnapshotWriter(self._shared, ttl_seconds)
        self._window = scripts.register(redis, "history_window")
        self._take_leases = scripts.register(redis, "take_expired_leases")

    async def aclose(self) -> None:
        """Close the hot path's shared connection (at shutdown, before the client's pool)."""
        await self._shared.aclose()

    # Writes (one round trip each: the hot path) --------------------------------------------------------------
    async def append(
        self,
        session_id: str,
        message: Message,
        *,
        client_message_id: str | None = None,
        context_size: int = 0,
        lease: ReplyLease | None = None,
        rate_limit: int = 0,
        budget: BudgetCharge | None = None,
        language: str | None = None,
    ) -> AppendResult:
        """Store a message in order; a repeated clientMessageId (or message id) returns the first message instead.

        `language`: the message's language when detected confidently, recorded as the session's (None: keep it).

        First the session's messages per minute are counted (`rate_limit`, 0: none): over it, OverLimit and
        nothing else is done. With a `lease`, the reply this message awaits is leased to its owner in the same
        step; with a `budget`, that reply's paid call is charged to it (the verdict is the result's `budget`).
        SessionGone when the session is not there.
        """
        now = time.time()
        now_ms = int(now * 1000)
        script_keys = [
            *keys.conversation(session_id),
            keys.ACTIVE,
            keys.day_tokens(keys.utc_day()),
            keys.pending(session_id),
            keys.REPLY_LEASES,
            keys.rate_limit(RateBucket.MESSAGES, session_id),
        ]
        args: list[Any] = [
            message["id"],
            orjson.dumps(message),
            client_message_id or "",
            self.ttl_seconds,
            now_ms,
            now_iso(now + self.ttl_seconds),
            context_size,
            session_id,
            lease.owner if lease else "",
            int(now * 1000 + lease.seconds * 1000) if lease else 0,
            lease.reply_id if lease else "",
            rate_limit,
            RATE_WINDOW_MS,
            language or "",
        ]
        if budget is not None:
            script_keys += budget.counters
            script_keys += [keys.budget_noticed(counter) for counter in budget.counters]
            args += [
                budget.reserve,
                budget.ttl_seconds,
                budget.fixed,
                budget.cap,
                budget.truncated,
                budget.session_budget,
                *budget.limits,
            ]
        status, stored, *rest = await self._append(keys=script_keys, args=args)
        if status == -2:
            raise OverLimit(max(0.001, int(stored) / 1000))
        if status == -1:
            raise SessionGone(session_id)
        context, state = rest[0], rest[1]
        verdict = rest[5] if len(rest) > 5 else None
        return AppendResult(
            message=message if status == 1 else orjson.loads(stored),  # stored now: the very message
            duplicate=status == 0,
            context=[orjson.loads(item) for item in context],
            state=keys.text(state),
            session_tokens=int(rest[2]) if len(rest) > 2 else 0,
            day_tokens=int(rest[3]) if len(rest) > 3 else 0,
            orphan=orjson.loads(rest[4]) if len(rest) > 4 and rest[4] else None,
            budget=BudgetVerdict(int(verdict[0]), int(verdict[1]), bool(verdict[2]), int(verdict[3])) if verdict else None,
            language=keys.text(rest[6]) if len(rest) > 6 and rest[6] else "",
        )

    async def finish_reply(
        self,
        session_id: str,
        messages: Sequence[Message],
        *,
        streamed_id: str | None,
        attempts: Sequence[tuple[str, bool]],
        provider: str | None,
        confidence: float | None,
        latency_ms: float,
        tokens: int,
        settle: BudgetSettlement | None = None,
        streaks: Streaks | None = None,
    ) -> FinishedReply:
        """Store an answer and everything counted about it in one round trip (the hot path's second write).

        With `settle`, the reply's budget reservation is corrected in the same step (the result's `used`: today's
        global budget counter after that, None: nothing settled); with `streaks`, the session's misses and negative
        messages in a row move too and are reported. The counters move even when the session is gone; the
        messages then raise SessionGone.
        """
        now = time.time()
        day = keys.utc_day()
        args: list[Any] = [
            self.ttl_seconds,
            int(now * 1000),
            now_iso(now + self.ttl_seconds),
            session_id,
            streamed_id or "",
            max(0, tokens),
            provider or "none",
            "" if confidence is None else repr(float(confidence)),
            latency_bucket(latency_ms),
            settle.difference if settle is not None else 0,
            settle.ttl_seconds if settle is not None else 0,
            len(attempts),
        ]
        for name, failed in attempts:
            args += [name, "1" if failed else "0"]
        if streaks is None:
            args.append(0)
        else:
            args += [2, "misses", _step(streaks.miss), streaks.misses_limit]
            args += ["negatives", _step(streaks.negative), streaks.negatives_limit]
        for message in messages:
            args += [message["id"], orjson.dumps(message)]
        finished, used, *counts = await self._finish(
            keys=[
                *keys.conversation(session_id),
                keys.ACTIVE,
                keys.in_flight(session_id),
                keys.day_tokens(day),
                keys.analytics(day),
                keys.USAGE,
                keys.pending(session_id),
                keys.REPLY_LEASES,
                *(settle.counters if settle is not None else ()),
            ],
            args=args,
        )
        if finished == -1:
            raise SessionGone(session_id)
        return FinishedReply(
            used=None if int(used) < 0 else int(used),
            misses=int(counts[0]) if streaks is not None else None,
            negatives=int(counts[1]) if streaks is not None else None,
        )

    # Reads --------------------------------------------------------------------------------------------------
    async def history(self, session_id: str, limit: int, before: str | None = None) -> HistoryPage:
        """The newest `limit` messages (older than `before`), oldest first; MessageUnknown for an unknown `before`."""
        found, start, raw = await self._around(session_id, before, -limit, -1)
        if not found:
            raise MessageUnknown("before", before)
        return HistoryPage(messages=[orjson.loads(item) for item in raw], has_more=bool(raw) and start > 0)

    async def messages_after(self, session_id: str, message_id: str | None, limit: int = 500) -> list[Message]:
        """What a rejoining client missed: everything after `message_id`, or the latest page."""
        if message_id is None:
            return (await self.history(session_id, limit)).messages
        found, _, raw = await self._around(session_id, message_id, 1, limit)
        if not found:
            return (await self.history(session_id, limit)).messages
        return [orjson.loads(item) for item in raw]

    async def message(self, session_id: str, message_id: str) -> Message | None:
        """One stored message of the session, or None (never stored, or trimmed off)."""
        _, _, raw = await self._around(session_id, message_id, 0, 0)
        return orjson.loads(raw[0]) if raw else None

    async def find_reply(self, session_id: str, user_message_id: str) -> Message | None:
        """The answer stored for a user message, for idempotent REST retries."""
        _, _, raw = await self._around(session_id, user_message_id, 1, 20)
        for item in raw:
            message: Message = orjson.loads(item)
            if message.get("replyTo") == user_message_id:
                return message
        return None

    async def message_with_context(
        self, session_id: str, message_id: str, context_size: int
    ) -> tuple[Message, list[Message]] | None:
        """A stored message and the `context_size` messages before it, to answer it again after a crash."""
        found, _, raw = await self._around(session_id, message_id, -context_size, 0)
        if not found or not raw:
            return None
        items: list[Message] = [orjson.loads(item) for item in raw]
        return items[-1], items[:-1]

    async def transcript(self, session_id: str) -> list[Message]:
        """The whole conversation, oldest first."""
        return [orjson.loads(item) for item in await self.redis.lrange(keys.history(session_id), 0, -1)]

    async def _around(self, session_id: str, anchor_id: str | None, first: int, last: int) -> tuple[bool, int, list[bytes]]:
        """History list items [anchor + first, anchor + last] around a message (None: the end), trim-aware."""
        found, start, raw = await self._window(
            keys=[keys.session(session_id), keys.history(session_id), keys.message_index(session_id)],
            args=[anchor_id or "", first, last],
        )
        return found == 1, int(start), list(raw)

    # Replies being written ----------------------------------------------------------------------------------
    async def save_in_flight(self, session_id: str, message_id: str, text: str, index: int, provider: str) -> None:
        """The text so far of a reply being streamed, so a rejoin on any process can catch up.

        This runs before every chunk event of every stream, so the snapshots of all streams are written
        together (see SnapshotWriter); it returns once this one is in Redis.
        """
        snapshot = {"messageId": message_id, "text": text, "index": index, "provider": provider}
        await self._snapshots.write(keys.in_flight(session_id), orjson.dumps(snapshot))

    async def in_flight(self, session_id: str) -> dict[str, Any] | None:
        """`{messageId, text, index, provider}` of the reply being written, if any."""
        try:
            raw = await self.redis.get(keys.in_flight(session_id))
        except ResponseError:  # a snapshot in the older hash form: nothing to resume from
            return None
        if not raw:
            return None
        snapshot = orjson.loads(raw)
        return {
            "messageId": snapshot["messageId"],
            "text": snapshot["text"],
            "index": int(snapshot["index"]),
            "provider": snapshot.get("provider") or None,
        }

    def session_lock(self, session_id: str, token: str, timeout: float = 5, wait: float = 120) -> SessionLock:
        """A Redis lock so one session's messages are handled one at a time across processes.

        Short-lived and renewed by its holder, so a crashed process frees the session within seconds. Its
        holder acquires it with a token that starts with its instance id and a colon: a process that takes
        over the dead holder's reply frees the lock at once (see take_expired_leases). Raises LockError
        (server.storage.errors) when it stays taken.
        """
        return SessionLock(self._shared, self._lock_script, keys.lock(session_id), token, timeout, wait)

    # Reply leases -------------------------------------------------------------------------------------------
    async def lease(self, session_id: str, message_id: str, lease: ReplyLease) -> None:
        """Lease the reply a stored message awaits (again, after an orphan's reply was finished first)."""
        pending = {"replyTo": message_id, "replyId": lease.reply_id, "owner": lease.owner, "attempt": 1}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.pending(session_id), orjson.dumps(pending), ex=self.ttl_seconds)
            pipe.zadd(keys.REPLY_LEASES, {session_id: int(time.time() * 1000 + lease.seconds * 1000)})
            await pipe.execute()

    async def renew_leases(self, session_ids: Sequence[str], seconds: float) -> None:
        """The owner is alive: push its replies' leases forward (only leases that still exist)."""
        if not session_ids:
            return
        expiry = int(time.time() * 1000 + seconds * 1000)
        await self.redis.zadd(keys.REPLY_LEASES, dict.fromkeys(session_ids, expiry), xx=True)

    async def release_lease(self, session_id: str) -> None:
        """The awaited reply exists after all: nothing is left to finish."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.pending(session_id))
            pipe.zrem(keys.REPLY_LEASES, session_id)
            await pipe.execute()

    async def take_expired_leases(
        self, owner: str, seconds: float, limit: int = 20, grace: float = 0.0
    ) -> list[tuple[str, dict[str, Any]]]:
        """Replies whose owner died (lease expired more than `grace` ago), now leased to `owner`."""
        now_ms = int(time.time() * 1000)
        raw = await self._take_leases(
            keys=[keys.REPLY_LEASES],
            args=[
                now_ms - int(grace * 1000),
                owner,
                now_ms + int(seconds * 1000),
                limit,
                keys.PENDING_PREFIX,
                keys.TAG_END,
                keys.IN_FLIGHT_PREFIX,
                keys.LOCK_PREFIX,
            ],
        )
        return [(raw[i].decode(), orjson.loads(raw[i + 1])) for i in range(0, len(raw), 2)]


class SessionLock:
    """A session's turn across processes, as redis-py's Lock keeps it (SET NX PX, renewed and released by token)
    but over the hot path's shared connection: a turn scaled out costs two commands more, not two pool round trips."""

    def __init__(
        self, shared: scripts.SharedConnection, script: scripts.HotScript, key: str, token: str, timeout: float, wait: float
    ) -> None:
        self._shared = shared
        self._script = script
        self._key = key
        self.token = token
        self._ttl_ms = int(timeout * 1000)
        self._wait = wait

    async def acquire(self) -> bool:
        """Take the lock, trying every LOCK_POLL_SECONDS for up to `wait` seconds (False: it stayed taken)."""
        command = scripts.pack(("SET", self._key, self.token, "NX", "PX", self._ttl_ms))
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._wait
        while await self._shared.execute(command) is None:
            if loop.time() + LOCK_POLL_SECONDS > give_up_at:
                return False
            await asyncio.sleep(LOCK_POLL_SECONDS)
        return True

    async def reacquire(self) -> None:
        """Give the lock its full time to live again; LockNotOwnedError when it is no longer ours."""
        if not await self._script(keys=[self._key], args=[self.token, self._ttl_ms]):
            raise LockNotOwnedError("the session lock is no longer ours")

    async def release(self) -> None:
        """Free the lock; LockNotOwnedError when it is no longer ours (it ran out, or was taken over)."""
        if not await self._script(keys=[self._key], args=[self.token, 0]):
            raise LockNotOwnedError("the session lock is no longer ours")


class SnapshotWriter:
    """Streamed-text snapshots, written over the hot path's shared connection: the snapshots of every stream sent in
    the same turn of the event loop go out in one socket write, and their answers come back in one read.

    A command of its own per chunk through redis-py cost about 100 µs of client CPU each, a third of the server's
    CPU with 100 streams; pipelined, a snapshot costs a few µs. Callers still wait until their snapshot is stored,
    so a chunk never goes out before Redis holds its text; commands on one connection run in order, so the newest
    value of a key wins.
    """

    def __init__(self, shared: scripts.SharedConnection, ttl_seconds: int) -> None:
        self._shared = shared
        self._ttl_seconds = ttl_seconds

    async def write(self, key: str, value: bytes) -> None:
        """Store `value` under `key` with the session's time to live."""
        await self._shared.execute(scripts.pack(("SET", key, value, "EX", self._ttl_seconds)))


def _step(step: bool | None) -> str:
    """A streak's step as finish_reply.lua reads it."""
    return "" if step is None else "1" if step else "0"
