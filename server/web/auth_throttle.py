"""Throttled secret sign-ins (agent keys, the metrics token): failures counted in Redis per client address, lockouts.

Guessing a key costs one failure; after AGENT_AUTH_FAILURES_PER_MINUTE of them in a minute the address is locked
out for AGENT_AUTH_LOCKOUT seconds, during which even the right key is refused (otherwise guessing would simply go
on). Once AGENT_AUTH_GLOBAL_FAILURES_PER_MINUTE failures came from all addresses together (a guesser spread over
many addresses), every address that already failed in that minute is refused until it ends, while
addresses with no failure (the agents themselves) still sign in. The counts live in Redis, so every process of a
scaled-out deployment shares them. Every failure is logged with the client address and the route, never the key.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import redis.asyncio as aioredis
from aiohttp import web
from loguru import logger

from server.app_keys import RATE_LIMITS, REDIS, SETTINGS
from server.errors import ApiError
from server.storage.sessions import PREFIX, REDIS_DOWN

T = TypeVar("T")

WINDOW_SECONDS = 60
_KEY = f"{PREFIX}:authfail"

# One atomic step after the key was compared, so concurrent guesses cannot slip past the limit: the verdict only
# counts while the address is admitted, and a right key is refused like a wrong one once the address is locked out.
# KEYS: lockout(address), failures(address), failures(all), refused(address)
# ARGV: verdict (1 right, 0 wrong), window ms, failures allowed, lockout ms, failures allowed from all addresses
# Returns {ms to wait (0: admitted), refusals so far, 1 if the global limit refused it, failures, all failures, locked}.
_RECORD_SCRIPT = """
local ttl = redis.call('PTTL', KEYS[1])
local global = 0
if ttl <= 0 then
  ttl = 0
  local limit = tonumber(ARGV[5])
  if limit > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= limit
      and tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then
    ttl = redis.call('PTTL', KEYS[3])
    if ttl <= 0 then ttl = 0 else global = 1 end
  end
end
if ttl > 0 then
  local refused = redis.call('INCR', KEYS[4])
  if refused == 1 then redis.call('PEXPIRE', KEYS[4], ttl) end
  return {ttl, refused, global, 0, 0, 0}
end
if ARGV[1] == '1' then return {0, 0, 0, 0, 0, 0} end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
local g = redis.call('INCR', KEYS[3])
if g == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
local locked = 0
if n >= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[2], KEYS[4])
  locked = 1
end
return {0, 0, 0, n, g, locked}
"""


def address_bucket(ip: str) -> str:
    """What one client is counted as: its IPv4 address, or its IPv6 /64 (one subscriber's usual allocation)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:64] or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _milestone(count: int) -> bool:
    """Log refusals during a lockout at 1, 10, 100, ...: the operator sees it go on without a line per attempt."""
    return count > 0 and str(count).rstrip("0") == "1"


class AuthThrottle:
    """Admits, counts and locks out sign-ins with a shared secret, per client address, in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        failures_per_minute: int,
        lockout_seconds: float,
        global_failures_per_minute: int,
    ) -> None:
        self.failures_per_minute = failures_per_minute
        self.lockout_ms = max(1000, int(lockout_seconds * 1000))
        self.global_failures_per_minute = max(0, global_failures_per_minute)
        self._record = redis.register_script(_RECORD_SCRIPT)

    @classmethod
    def for_app(cls, app: web.Application) -> AuthThrottle:
        """The throttle over the app's Redis with its settings (cheap: no I/O)."""
        settings = app[SETTINGS]
        return cls(
            app[REDIS],
            failures_per_minute=settings.agent_auth_failures_per_minute,
            lockout_seconds=settings.agent_auth_lockout,
            global_failures_per_minute=settings.agent_auth_global_failures_per_minute,
        )

    @staticmethod
    def client_ip(app: web.Application, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address as the rate limits see it (X-Forwarded-For only from TRUSTED_PROXIES)."""
        return app[RATE_LIMITS].client_ip(peer, forwarded_for)

    @property
    def enabled(self) -> bool:
        """AGENT_AUTH_FAILURES_PER_MINUTE=0 turns the throttle off (failures are still logged)."""
        return self.failures_per_minute > 0

    def _keys(self, bucket: str) -> list[str]:
        return [f"{_KEY}:lock:{bucket}", f"{_KEY}:count:{bucket}", f"{_KEY}:count:*all*", f"{_KEY}:refused:{bucket}"]

    async def authenticate(self, ip: str, where: str, what: str, verify: Callable[[], T | None], refusal: ApiError) -> T:
        """verify()'s answer, unless this address is locked out (rate_limited) or verify fails (refusal, counted).

        `where` names the route or namespace and `what` the secret, for the log; the presented secret never is.
        A Redis outage lets sign-ins through unthrottled (failures are still logged) rather than lock every agent out.
        """
        result = verify()  # constant time, and the same answer whatever the verdict once the address is locked out
        if not self.enabled:
            if result is None:
                logger.warning("auth failed: wrong or missing {} from {} on {}", what, _safe(ip), where)
                raise refusal
            return result
        args: list[Any] = [
            0 if result is None else 1,
            WINDOW_SECONDS * 1000,
            self.failures_per_minute,
            self.lockout_ms,
            self.global_failures_per_minute,
        ]
        try:
            answer = await self._record(keys=self._keys(address_bucket(ip)), args=args)
        except REDIS_DOWN:
            if result is None:
                logger.warning(
                    "auth failed: wrong or missing {} from {} on {} (not counted: Redis unavailable)", what, _safe(ip), where
                )
                raise refusal from None
            return result
        wait_ms, refused, by_global, failures, everyone, locked = (int(v) for v in answer)
        if wait_ms > 0:
            self._refused(ip, where, what, wait_ms / 1000, refused, bool(by_global))
        if result is None:
            self._failed(ip, where, what, failures, everyone, bool(locked))
            raise refusal
        return result

    def _refused(self, ip: str, where: str, what: str, wait: float, refused: int, by_global: bool) -> NoReturn:
        if _milestone(refused):
            reason = (
                "failed sign-ins from many addresses; this one already failed this minute"
                if by_global
                else "locked out after repeated failures"
            )
            logger.warning(
                "auth refused: {} sign-in from {} on {}: {} ({} attempts refused so far, {:.0f} s left)",
                what,
                _safe(ip),
                where,
                reason,
                refused,
                wait,
            )
        raise ApiError(
            "rate_limited",
            f"Too many failed sign-in attempts from your address; try again in {math.ceil(wait)} s.",
            retry_after=wait,
        )

    def _failed(self, ip: str, where: str, what: str, failures: int, everyone: int, locked: bool) -> None:
        logger.warning(
            "auth failed: wrong or missing {} from {} on {} ({}/{} failures this minute from this address)",
            what,
            _safe(ip),
            where,
            failures,
            self.failures_per_minute,
        )
        if locked:
            logger.warning(
                "auth lockout: {} refused on every agent and metrics route for {:g} s after {} failed sign-ins",
                _safe(ip),
                self.lockout_ms / 1000,
                failures,
            )
        if self.global_failures_per_minute and everyone == self.global_failures_per_minute:
            logger.error(
                "auth: {} failed sign-ins from all addresses this minute: addresses that failed are refused until it ends",
                everyone,
            )


def _safe(ip: str) -> str:
    """The address for a log line: printable and bounded (a forwarded-for hop is the client's text)."""
    return "".join(c if c.isprintable() else "?" for c in ip[:64]) or "unknown"
