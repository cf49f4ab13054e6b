"""The agents' queue: waiting sessions, claims, agent holds and their idle clock, agents online, overdue entries."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from server.contract import QueueEntry, SessionState
from server.storage import keys, scripts


@dataclass(frozen=True, slots=True)
class Claim:
    """An agent's claim: won (with the queue entry, if one was kept), or lost to the session's current state."""

    won: bool
    entry: QueueEntry | None = None
    state: str = ""  # when lost: the session's state ('' when it is gone)


class QueueStore:
    """Who waits for a person and who holds whom, refereed by Redis across processes."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._enqueue = scripts.register(redis, "enqueue")
        self._claim = scripts.register(redis, "claim")
        self._release = scripts.register(redis, "release")
        self._expire_waiting = scripts.register(redis, "expire_waiting")
        self._drop_expired = scripts.register(redis, "drop_expired_handoffs")

    # Waiting ------------------------------------------------------------------------------------------------
    async def enqueue(self, session_id: str, entry: QueueEntry) -> bool | None:
        """Queue a session for agents; False when it already waits or is held, None when it is gone."""
        status = await self._enqueue(
            keys=[keys.session(session_id), keys.QUEUE, keys.QUEUE_ENTRIES],
            args=[session_id, orjson.dumps(entry), int(time.time() * 1000)],
        )
        return None if status == -1 else bool(status == 1)

    async def entries(self) -> list[QueueEntry]:
        """Waiting sessions, oldest first."""
        ids = cast("list[bytes]", await self.redis.zrange(keys.QUEUE, 0, -1))
        if not ids:
            return []
        raw = await self.redis.hmget(keys.QUEUE_ENTRIES, ids)
        return [orjson.loads(item) for item in raw if item]

    async def update_entry(self, session_id: str, **fields: Any) -> bool:
        """Add late facts (the summary) to a waiting entry; False when it no longer waits."""
        raw = await self.redis.hget(keys.QUEUE_ENTRIES, session_id)
        if raw is None:
            return False
        entry = orjson.loads(raw) | fields
        await self.redis.hset(keys.QUEUE_ENTRIES, session_id, orjson.dumps(entry))
        return True

    # Holds --------------------------------------------------------------------------------------------------
    async def claim(self, session_id: str, agent_name: str) -> Claim:
        """One agent wins a waiting session; everyone else learns its state."""
        won, value = await self._claim(
            keys=[keys.session(session_id), keys.QUEUE, keys.QUEUE_ENTRIES, keys.AGENT_ACTIVITY],
            args=[session_id, agent_name, int(time.time() * 1000)],
        )
        if won == 1:
            return Claim(True, cast("QueueEntry", orjson.loads(value)) if value else None)
        return Claim(False, None, value.decode() if isinstance(value, bytes) else str(value))

    async def release(self, session_id: str, agent_name: str | None, new_state: str, idle_cutoff_ms: int | None = None) -> int:
        """1 released, 0 not held (or active again), -1 held by another agent (see release.lua)."""
        return int(
            await self._release(
                keys=[keys.session(session_id), keys.AGENT_ACTIVITY],
                args=[session_id, agent_name or "", new_state, "" if idle_cutoff_ms is None else idle_cutoff_ms],
            )
        )

    async def holder(self, session_id: str) -> str | None:
        """The agent holding the session, if one does."""
        state, name = await self.redis.hmget(keys.session(session_id), ["state", "agentName"])
        return keys.text(name) if state == SessionState.AGENT.value.encode() and name else None

    async def held_by(self, agent_name: str) -> list[str]:
        """The conversations an agent holds now (to put a reconnecting agent back in their rooms)."""
        held = [member.decode() for member in cast("list[bytes]", await self.redis.zrange(keys.AGENT_ACTIVITY, 0, -1))]
        if not held:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in held:
                pipe.hmget(keys.session(session_id), ["state", "agentName"])
            holders = await pipe.execute()
        agent = SessionState.AGENT.value.encode()
        return [
            session_id
            for session_id, (state, name) in zip(held, holders, strict=True)
            if state == agent and name is not None and name.decode() == agent_name
        ]

    async def touch_agent_activity(self, session_id: str) -> None:
        """An agent wrote: the idle clock starts again."""
        await self.redis.zadd(keys.AGENT_ACTIVITY, {session_id: int(time.time() * 1000)}, xx=True)

    # Timers -------------------------------------------------------------------------------------------------
    async def overdue(self, wait_cutoff_ms: int, idle_cutoff_ms: int) -> tuple[list[str], list[str]]:
        """Sessions waiting since before the wait cutoff, and agent holds idle since before the idle cutoff."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(keys.QUEUE, "-inf", wait_cutoff_ms)
            pipe.zrangebyscore(keys.AGENT_ACTIVITY, "-inf", idle_cutoff_ms)
            waiting, idle = await pipe.execute()
        return [w.decode() for w in waiting], [i.decode() for i in idle]

    async def take_overdue_waiting(self, session_id: str, wait_cutoff_ms: int) -> dict[str, Any] | None:
        """The queue entry ({} if none was kept), when this process is the one that moves it to a ticket."""
        entry = await self._expire_waiting(
            keys=[keys.session(session_id), keys.QUEUE, keys.QUEUE_ENTRIES],
            args=[session_id, wait_cutoff_ms],
        )
        if entry is None:
            return None
        return orjson.loads(entry) if entry else {}

    async def drop_expired(self, look_at: int = 200) -> list[str]:
        """Queue and agent-hold entries whose session expired, removed (among the oldest `look_at` of each)."""
        removed = await self._drop_expired(
            keys=[keys.QUEUE, keys.QUEUE_ENTRIES, keys.AGENT_ACTIVITY, keys.REPLY_LEASES],
            args=[keys.SESSION_PREFIX, keys.TAG_END, look_at],
        )
        return [item.decode() if isinstance(item, bytes) else str(item) for item in removed]

    # Agents online ------------------------------------------------------------------------------------------
    async def agent_seen(self, member: str, *, online: bool) -> None:
        """Keep the shared register of connected agents (each process refreshes its own)."""
        if online:
            await self.redis.zadd(keys.AGENTS_ONLINE, {member: int(time.time() * 1000)})
        else:
            await self.redis.zrem(keys.AGENTS_ONLINE, member)

    async def agents_online(self, fresh_within_ms: int) -> int:
        """Agents connected to any process, seen within the window."""
        cutoff = int(time.time() * 1000) - fresh_within_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(keys.AGENTS_ONLINE, "-inf", cutoff)
            pipe.zcard(keys.AGENTS_ONLINE)
            _, count = await pipe.execute()
        return int(count)
