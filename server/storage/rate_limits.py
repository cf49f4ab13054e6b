"""Counters that limit: fixed-window rate limits, the day's token budgets, failed sign-ins. Shared by every process."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import redis.asyncio as aioredis

from server.storage import keys, scripts
from server.storage.keys import RateBucket

__all__ = ["RateBucket", "RateLimitStore", "SignInVerdict"]

# (ms to wait (0: admitted), refusals so far, 1 if the global limit refused, failures, all failures, 1 if locked now)
SignInVerdict = tuple[int, int, int, int, int, int]


class RateLimitStore:
    """Atomic counters: each check is one Lua step, so concurrent requests cannot slip past a limit."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._window = scripts.register(redis, "fixed_window")
        self._budget = scripts.register(redis, "budgets", includes=("budget_charge",))
        self._sign_in = scripts.register(redis, "auth_failures")

    # Fixed windows (policy in server/web/rate_limits.py) ----------------------------------------------------
    async def over_limit(self, bucket: RateBucket, owner: str, limit: int, window_seconds: int = 60) -> float | None:
        """Count one hit of `owner` in a shared fixed window; seconds to wait when the limit is passed, else None."""
        if limit <= 0:
            return None
        count, ttl_ms = await self._window(keys=[keys.rate_limit(bucket, owner)], args=[window_seconds * 1000])
        if int(count) <= limit:
            return None
        return max(0.001, int(ttl_ms) / 1000)

    # Token budgets (policy in server/chat/budgets.py) -------------------------------------------------------
    @staticmethod
    def budget_key(day: str, scope: str = "", owner: str = "") -> str:
        """A day's budget counter: everyone's (no scope), or one visitor's or client address's."""
        return keys.budget(day, scope, owner)

    async def charge_budgets(self, counters: Sequence[tuple[str, int]], tokens: int, ttl_seconds: int) -> tuple[int, int, bool]:
        """Reserve `tokens` on every counter at once unless one would pass its limit (atomic, across processes).

        `counters` are (key, limit) with the global one first; returns (index of the counter that refused, 1-based,
        or 0 when charged; today's global tokens; whether that counter refused for the first time today).
        """
        names = [key for key, _ in counters]
        refused, used, first = await self._budget(
            keys=[*names, *(keys.budget_noticed(key) for key in names)],
            args=[tokens, ttl_seconds, *(limit for _, limit in counters)],
        )
        return int(refused), int(used), bool(first)

    async def settle_budgets(self, counters: Sequence[str], difference: int, ttl_seconds: int) -> int:
        """Correct reserved tokens by what the provider reported using; returns today's global tokens."""
        _, used, _ = await self._budget(
            keys=[*counters, *(keys.budget_noticed(key) for key in counters)],
            args=[difference, ttl_seconds, *(0 for _ in counters)],
        )
        return int(used)

    async def budget_salt(self, day: str, ttl_seconds: int) -> str:
        """The day's random salt for client-address counters (shared by every process, gone after two days)."""
        key = keys.budget_salt(day)
        await self.redis.set(key, secrets.token_hex(16), nx=True, ex=ttl_seconds)
        salt = await self.redis.get(key)
        return salt.decode() if isinstance(salt, bytes) else str(salt)

    # Failed sign-ins (policy in server/web/auth_throttle.py) ------------------------------------------------
    async def record_sign_in(
        self, bucket: str, *, admitted: bool, window_ms: int, allowed: int, lockout_ms: int, global_allowed: int
    ) -> SignInVerdict:
        """Count a sign-in's verdict for a client address bucket unless it is locked out (see auth_failures.lua)."""
        answer = await self._sign_in(
            keys=keys.auth_failures(bucket),
            args=[1 if admitted else 0, window_ms, allowed, lockout_ms, global_allowed],
        )
        wait_ms, refused, by_global, failures, everyone, locked = (int(v) for v in answer)
        return wait_ms, refused, by_global, failures, everyone, locked
