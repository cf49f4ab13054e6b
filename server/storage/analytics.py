"""Analytics: per-day figures, provider usage, feedback on replies, active sessions and today's tokens."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis

from server.contract import now_iso
from server.storage import keys, scripts
from server.storage.errors import ReplyUnknown

if TYPE_CHECKING:
    from server.storage.messages import MessageStore

LATENCY_BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class AnalyticsStore:
    """Counters shared by every process: what the operator's analytics, health and metrics show."""

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, messages: MessageStore) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._messages = messages
        self._record_feedback = scripts.register(redis, "record_feedback")

    async def analytics(self, days: int = 30) -> list[dict[str, Any]]:
        """Per-day figures for the last `days` days, newest last."""
        today = datetime.now(tz=UTC).date()
        dates = [(today - timedelta(days=offset)).isoformat() for offset in range(days - 1, -1, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in dates:
                pipe.hgetall(keys.analytics(day))
                pipe.scard(keys.analytics_escalated(day))
            raw = await pipe.execute()
        return [summarize_day(day, raw[i * 2], int(raw[i * 2 + 1])) for i, day in enumerate(dates)]

    # Feedback -----------------------------------------------------------------------------------------------
    async def record_feedback(self, session_id: str, message_id: str, rating: str, comment: str | None) -> dict[str, Any]:
        """Keep one rating per reply (a new one replaces it) and count it for the day it was given.

        ReplyUnknown unless `message_id` is one of the session's assistant replies.
        """
        message = await self._messages.message(session_id, message_id)  # trim-aware
        if message is None or message.get("role") != "assistant":
            raise ReplyUnknown(message_id)
        day = keys.utc_day()
        entry = {"messageId": message_id, "rating": rating, "comment": comment, "createdAt": now_iso()}
        await self._record_feedback(
            keys=[keys.feedback(session_id), keys.analytics(day)],
            args=[message_id, orjson.dumps(entry | {"day": day}), rating, self.ttl_seconds, keys.ANALYTICS_PREFIX],
        )
        return entry

    async def feedback_given(self, session_id: str) -> list[dict[str, Any]]:
        """The ratings and comments given in a session, oldest first."""
        entries = [orjson.loads(item) for item in await self.redis.hvals(keys.feedback(session_id))]
        return sorted(({k: v for k, v in e.items() if k != "day"} for e in entries), key=lambda e: e.get("createdAt", ""))

    # Providers and tokens -----------------------------------------------------------------------------------
    async def provider_usage(self) -> dict[str, int]:
        """`{"openai:requests": n, ...}` across all processes."""
        raw = await self.redis.hgetall(keys.USAGE)
        return {keys.text(k): int(v) for k, v in raw.items()}

    async def count_provider_calls(self, attempts: Sequence[tuple[str, bool]]) -> None:
        """Provider usage of calls made outside a reply (summaries), shared by every process."""
        if not attempts:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, failed in attempts:
                pipe.hincrby(keys.USAGE, f"{name}:requests", 1)
                if failed:
                    pipe.hincrby(keys.USAGE, f"{name}:failures", 1)
            await pipe.execute()

    async def tokens_today(self) -> int:
        """Provider tokens used today, across processes."""
        return int(await self.redis.get(keys.day_tokens(keys.utc_day())) or 0)

    # Active sessions ----------------------------------------------------------------------------------------
    async def active_sessions(self) -> int:
        """Sessions with activity within their TTL (entries older than that are pruned: a write)."""
        cutoff = (time.time() - self.ttl_seconds) * 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(keys.ACTIVE, "-inf", cutoff)
            pipe.zcard(keys.ACTIVE)
            _, count = await pipe.execute()
        return int(count)

    async def count_active_sessions(self) -> int:
        """The same figure by a read only (ZCOUNT), for answers anyone may ask for often (health)."""
        cutoff = (time.time() - self.ttl_seconds) * 1000
        return int(await self.redis.zcount(keys.ACTIVE, f"({cutoff}", "+inf"))


def latency_bucket(ms: float) -> int:
    """The upper edge of the bucket a latency falls in (cheap percentiles without storing samples)."""
    for edge in LATENCY_BUCKETS_MS:
        if ms <= edge:
            return edge
    return 120000


def summarize_day(day: str, raw: dict[bytes, bytes], escalated_sessions: int) -> dict[str, Any]:
    """One day's stored counters as the analytics answer shows them."""
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    conversations = int(fields.get("conversations", 0))
    providers = {k.split(":", 1)[1]: int(v) for k, v in fields.items() if k.startswith("provider:")}
    replies = sum(providers.values())
    buckets = sorted((int(k.split(":", 1)[1]), int(v)) for k, v in fields.items() if k.startswith("latency:"))

    def percentile(q: float) -> int | None:
        total = sum(n for _, n in buckets)
        if not total:
            return None
        seen = 0
        for edge, n in buckets:
            seen += n
            if seen >= q * total:
                return edge
        return buckets[-1][0]

    up, down = int(fields.get("feedback:up", 0)), int(fields.get("feedback:down", 0))
    confidence_count = int(fields.get("confidenceCount", 0))
    return {
        "date": day,
        "conversations": conversations,
        "containmentRate": None if not conversations else round(max(0.0, 1 - escalated_sessions / conversations), 4),
        "escalations": {k.split(":", 1)[1]: int(v) for k, v in fields.items() if k.startswith("escalation:")},
        "replies": replies,
        "providerShare": {name: round(n / replies, 4) for name, n in providers.items()} if replies else {},
        "meanConfidence": round(float(fields["confidenceSum"]) / confidence_count, 4) if confidence_count else None,
        "tokensUsed": int(fields.get("tokens", 0)),
        "replyLatencyMs": {"p50": percentile(0.5), "p95": percentile(0.95)},
        "feedback": {"up": up, "down": down, "score": round((up - down) / (up + down), 4) if up + down else None},
    }
