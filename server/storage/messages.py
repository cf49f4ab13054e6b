"""Messages: a session's history (append, pages, lookups), finished replies, replies in flight and their leases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from server.contract import Message, now_iso
from server.storage import keys, scripts
from server.storage.analytics import latency_bucket
from server.storage.errors import MessageUnknown, SessionGone


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
        self._snapshots = SnapshotWriter(redis, ttl_seconds)
        self._append = scripts.register(redis, "append", includes=("trim_history",))
        self._finish = scripts.register(redis, "finish_reply", includes=("trim_history",))
        self._window = scripts.register(redis, "history_window")
        self._take_leases = scripts.register(redis, "take_expired_leases")

    # Writes (one round trip each: the hot path) --------------------------------------------------------------
    async def append(
        self,
        session_id: str,
        message: Message,
        *,
        client_message_id: str | None = None,
        context_size: int = 0,
        lease: ReplyLease | None = None,
    ) -> AppendResult:
        """Store a message in order; a repeated clientMessageId (or message id) returns the first message instead.

        With a `lease`, the reply this message awaits is leased to its owner in the same step. SessionGone when
        the session is not there.
        """
        now = time.time()
        now_ms = int(now * 1000)
        status, stored, context, state, *rest = await self._append(
            keys=[
                *keys.conversation(session_id),
                keys.ACTIVE,
                keys.day_tokens(keys.utc_day()),
                keys.pending(session_id),
                keys.REPLY_LEASES,
            ],
            args=[
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
            ],
        )
        if status == -1:
            raise SessionGone(session_id)
        return AppendResult(
            message=orjson.loads(stored),
            duplicate=status == 0,
            context=[orjson.loads(item) for item in context],
            state=state.decode() if isinstance(state, bytes) else str(state),
            session_tokens=int(rest[0]) if rest else 0,
            day_tokens=int(rest[1]) if len(rest) > 1 else 0,
            orphan=orjson.loads(rest[2]) if len(rest) > 2 and rest[2] else None,
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
    ) -> None:
        """Store an answer and everything counted about it in one round trip (the hot path's second write).

        The counters move even when the session is gone; the messages then raise SessionGone.
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
            len(attempts),
        ]
        for name, failed in attempts:
            args += [name, "1" if failed else "0"]
        for message in messages:
            args += [message["id"], orjson.dumps(message)]
        finished = await self._finish(
            keys=[
                *keys.conversation(session_id),
                keys.ACTIVE,
                keys.in_flight(session_id),
                keys.day_tokens(day),
                keys.analytics(day),
                keys.USAGE,
                keys.pending(session_id),
                keys.REPLY_LEASES,
            ],
            args=args,
        )
        if finished == -1:
            raise SessionGone(session_id)

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

    def session_lock(self, session_id: str, timeout: float = 5, wait: float = 120) -> Lock:
        """A Redis lock so one session's messages are handled one at a time across processes.

        Short-lived and renewed by its holder, so a crashed process frees the session within seconds. Its
        holder acquires it with a token that starts with its instance id and a colon: a process that takes
        over the dead holder's reply frees the lock at once (see take_expired_leases). Raises LockError
        (server.storage.errors) when it stays taken.
        """
        return self.redis.lock(keys.lock(session_id), timeout=timeout, blocking_timeout=wait)

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


class SnapshotWriter:
    """Group commit for streamed-text snapshots: one pipeline of SETs for every snapshot waiting, then the next.

    A command of its own per chunk cost about 100 µs of client CPU each, a third of the server's CPU with 100
    streams; batched, a snapshot costs a few µs. Callers still wait until their snapshot is stored, so a chunk
    never goes out before Redis holds its text.
    """

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl_seconds = ttl_seconds
        self._pending: dict[str, bytes] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (the newest value of a key wins) along with everything else waiting."""
        self._pending[key] = value
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        await waiter

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, value in batch.items():
                        pipe.set(key, value, ex=self._ttl_seconds)
                    await pipe.execute()
            except Exception as err:
                self._fail(waiters, err)
            except BaseException:  # cancelled (shutdown): nobody may be left waiting
                self._fail(waiters + self._waiters, RedisConnectionError("snapshot writer stopped"))
                raise
            else:
                self._succeed(waiters)

    @staticmethod
    def _succeed(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @staticmethod
    def _fail(waiters: list[asyncio.Future[None]], err: BaseException) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(err)
                waiter.exception()  # a caller cancelled meanwhile must not log "never retrieved"
