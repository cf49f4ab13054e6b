"""Abuse limits kept in Redis so they hold across processes, and the client address they apply to."""

from __future__ import annotations

import contextlib
import ipaddress
from collections import Counter
from collections.abc import Iterator

from server.errors import ApiError
from server.storage.errors import STORAGE_DOWN
from server.storage.rate_limits import RateBucket, RateLimitStore


class RateLimits:
    """Sessions per IP, messages per session and socket connections per IP, per minute."""

    def __init__(
        self,
        counters: RateLimitStore,
        *,
        sessions_per_minute: int,
        messages_per_minute: int,
        connections_per_minute: int,
        trusted_proxies: tuple[str, ...],
        events_per_minute: int = 0,
        pending_per_client: int = 0,
    ) -> None:
        self._counters = counters
        self.pending_per_client = pending_per_client  # messages not yet stored, per client IP (0: no limit)
        self._pending = Counter[str]()  # client IP -> its messages waiting to be stored, in this process
        self.sessions_per_minute = sessions_per_minute
        self.messages_per_minute = messages_per_minute
        self.connections_per_minute = connections_per_minute
        self.events_per_minute = events_per_minute
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    @contextlib.contextmanager
    def waiting_message(self, ip: str) -> Iterator[None]:
        """Count a socket message until it is stored; refused while its client has too many waiting (one process)."""
        if 0 < self.pending_per_client <= self._pending[ip]:
            raise ApiError(
                "rate_limited",
                "Too many of your messages are waiting; wait for the replies, then send again.",
                retry_after=2,
            )
        self._pending[ip] += 1
        try:
            yield
        finally:
            self._pending[ip] -= 1
            if self._pending[ip] <= 0:
                del self._pending[ip]

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The peer address, or the first untrusted hop of X-Forwarded-For when the peer is a trusted proxy."""
        address = peer or "unknown"
        if not forwarded_for or not self._is_trusted(address):
            return address
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else address

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    async def check_session_creation(self, ip: str) -> None:
        """Raise rate_limited when this address opened too many sessions this minute."""
        await self._check(RateBucket.SESSIONS, ip, self.sessions_per_minute, "Too many new conversations")

    async def check_message(self, session_id: str) -> None:
        """Raise rate_limited when this session sent too many messages this minute."""
        await self._check(RateBucket.MESSAGES, session_id, self.messages_per_minute, "Too many messages")

    async def check_event(self, session_id: str) -> None:
        """Raise rate_limited when this session sent too many other events (escalate, feedback, ...) this minute."""
        await self._check(RateBucket.EVENTS, session_id, self.events_per_minute, "Too many requests")

    async def check_connection(self, ip: str) -> None:
        """Raise rate_limited when this address opened too many sockets this minute."""
        await self._check(RateBucket.CONNECTIONS, ip, self.connections_per_minute, "Too many connections")

    async def _check(self, bucket: RateBucket, owner: str, limit: int, what: str) -> None:
        try:
            wait = await self._counters.over_limit(bucket, owner, limit)
        except STORAGE_DOWN:  # fail open: an outage must not stop conversations
            return
        if wait is not None:
            raise ApiError("rate_limited", f"{what}; try again in {wait:.0f} s.", retry_after=wait)
