"""The health answer: enough for an operator or a load balancer, never a secret."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server import __version__
from server.ai.chain import ProviderChain
from server.storage.bundle import Storage
from server.storage.errors import STORAGE_FAILED
from server.storage.write_behind import WriteBehindStore

PRUNE_EVERY_SECONDS = 60.0  # at most one write (pruning expired sessions) a minute for an anonymous endpoint


@dataclass(frozen=True, slots=True)
class Gauges:
    """Live readings of the edges that health reports (read at each request, never cached)."""

    connected_clients: Callable[[], int]
    engine_connections: Callable[[], int] | None = None
    pubsub_healthy: Callable[[], bool] | None = None  # None: one process, no pub/sub to watch


class HealthService:
    """Builds the contract's health object from the live parts."""

    def __init__(
        self,
        storage: Storage,
        chain: ProviderChain,
        gauges: Gauges,
        *,
        instance_id: str,
        redis_mode: str,
        token_budget_per_day: int = 0,
        write_behind: WriteBehindStore | None = None,
    ) -> None:
        self._storage = storage
        self._redis_mode = redis_mode
        self._chain = chain
        self._connected_clients = gauges.connected_clients
        self._instance_id = instance_id
        self._pubsub_healthy = gauges.pubsub_healthy
        self._token_budget_per_day = token_budget_per_day
        self._write_behind = write_behind
        self._engine_connections = gauges.engine_connections
        self._started = time.monotonic()
        self._pruned_at: float | None = None

    async def ready(self) -> dict[str, Any]:
        """Whether this process can serve: Redis answers and, when scaled out, pub/sub delivers."""
        try:
            redis_ok = await self._storage.ping()
        except STORAGE_FAILED:
            redis_ok = False
        pubsub_ok = self._pubsub_healthy is None or self._pubsub_healthy()
        return {
            "ready": redis_ok and pubsub_ok,
            "redis": "ok" if redis_ok else "down",
            "pubsub": None if self._pubsub_healthy is None else ("ok" if pubsub_ok else "degraded"),
            "instanceId": self._instance_id,
        }

    async def report(self) -> dict[str, Any]:
        """`ok`, `degraded` (no provider usable) or `down` (Redis unreachable)."""
        usage: dict[str, int] = {}
        active_sessions = 0
        tokens_today = 0
        try:
            await self._storage.ping()
            redis_status = "ok"
            usage = await self._storage.analytics.provider_usage()
            active_sessions = await self._active_sessions()
            tokens_today = await self._storage.analytics.tokens_today()
        except STORAGE_FAILED:
            redis_status = "down"
        providers = [
            {
                "name": p.name,
                "configured": p.configured,
                "model": p.model,
                "state": self._chain.breakers[p.name].state,
                "requests": usage.get(f"{p.name}:requests", 0),
                "failures": usage.get(f"{p.name}:failures", 0),
            }
            for p in self._chain.providers
        ]
        usable = [p for p in providers if p["configured"] and p["state"] != "open"]
        buffered = self._write_behind.depth if self._write_behind is not None else 0
        buffer_full = self._write_behind is not None and buffered >= self._write_behind.capacity
        if buffer_full or (redis_status != "ok" and self._write_behind is None):
            status = "down"
        elif redis_status != "ok" or buffered or not usable or (self._pubsub_healthy is not None and not self._pubsub_healthy()):
            status = "degraded"  # chats go on: replies are produced and messages wait in the buffer
        else:
            status = "ok"
        return {
            "status": status,
            "version": __version__,
            "uptimeSeconds": round(time.monotonic() - self._started, 1),
            "instanceId": self._instance_id,
            "redis": {"status": redis_status, "mode": self._redis_mode},
            "pubsub": None if self._pubsub_healthy is None else ("ok" if self._pubsub_healthy() else "degraded"),
            "providers": providers,
            "writeBehind": {"depth": buffered, "capacity": self._write_behind.capacity if self._write_behind else 0},
            "activeSessions": active_sessions,
            "tokens": {"today": tokens_today, "budgetPerDay": self._token_budget_per_day},
            "connectedClients": self._connected_clients(),
            **({} if self._engine_connections is None else {"engineConnections": self._engine_connections()}),
        }

    async def _active_sessions(self) -> int:
        """Active sessions by a read (ZCOUNT); expired entries are pruned (a write) at most once a minute.

        Health is public, so an anonymous GET must not cost a Redis write each time.
        """
        now = time.monotonic()
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY_SECONDS:
            self._pruned_at = now
            return await self._storage.analytics.active_sessions()
        return await self._storage.analytics.count_active_sessions()
