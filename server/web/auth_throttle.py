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
from typing import NoReturn, TypeVar

from aiohttp import web
from loguru import logger

from server.app_keys import RATE_LIMITS, SETTINGS, STORAGE
from server.errors import ApiError
from server.storage.errors import STORAGE_DOWN
from server.storage.rate_limits import RateLimitStore

T = TypeVar("T")

WINDOW_SECONDS = 60


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
        counters: RateLimitStore,
        *,
        failures_per_minute: int,
        lockout_seconds: float,
        global_failures_per_minute: int,
    ) -> None:
        self.failures_per_minute = failures_per_minute
        self.lockout_ms = max(1000, int(lockout_seconds * 1000))
        self.global_failures_per_minute = max(0, global_failures_per_minute)
        self._counters = counters

    @classmethod
    def for_app(cls, app: web.Application) -> AuthThrottle:
        """The throttle over the app's counters with its settings (cheap: no I/O)."""
        settings = app[SETTINGS]
        return cls(
            app[STORAGE].rate_limits,
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
        try:
            verdict = await self._counters.record_sign_in(
                address_bucket(ip),
                admitted=result is not None,
                window_ms=WINDOW_SECONDS * 1000,
                allowed=self.failures_per_minute,
                lockout_ms=self.lockout_ms,
                global_allowed=self.global_failures_per_minute,
            )
        except STORAGE_DOWN:
            if result is None:
                logger.warning(
                    "auth failed: wrong or missing {} from {} on {} (not counted: Redis unavailable)", what, _safe(ip), where
                )
                raise refusal from None
            return result
        wait_ms, refused, by_global, failures, everyone, locked = verdict
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
