"""Prometheus metrics, in a registry of the app's own (no process-global collectors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800)
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """What operators watch: traffic, providers, breakers, escalations, handoff waits, Redis and its buffer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sockets_connected = Gauge("support_sockets_connected", "Customer sockets connected to this process", registry=r)
        self.sessions_active = Gauge("support_sessions_active", "Sessions with activity within their TTL", registry=r)
        self.messages = Counter("support_messages", "Chat messages", ["direction"], registry=r)
        self.messages_in = self.messages.labels("in")
        self.messages_out = self.messages.labels("out")
        self.provider_requests = Counter("support_provider_requests", "Provider attempts", ["provider"], registry=r)
        self.provider_failures = Counter("support_provider_failures", "Failed provider attempts", ["provider"], registry=r)
        self.provider_latency = Histogram(
            "support_provider_latency_seconds", "Provider attempt duration", ["provider"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "support_time_to_first_token_seconds",
            "Time to a provider's first delta",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "support_breaker_state", "Circuit state per provider (0 closed, 1 half open, 2 open)", ["provider"], registry=r
        )
        self.escalations = Counter("support_escalations", "Escalations", ["trigger"], registry=r)
        self.handoff_wait = Histogram(
            "support_handoff_wait_seconds", "Wait from escalation to an agent's claim", buckets=WAIT_BUCKETS, registry=r
        )
        self.redis_latency = Histogram(
            "support_redis_command_seconds", "Latency of the message-append script", buckets=REDIS_BUCKETS, registry=r
        )
        self.write_behind_depth = Gauge("support_write_behind_depth", "Messages waiting for Redis", registry=r)
        self.engine_connections = Gauge(
            "support_engineio_connections",
            "Engine.IO transports open on this process, whether or not they joined a namespace",
            registry=r,
        )
        self.transport_refusals = Counter(
            "support_transport_refusals",
            "Connections refused or closed by the transport guard, by reason",
            ["reason"],
            registry=r,
        )
        self.budget_degraded = Gauge(
            "support_budget_degraded",
            "1 while today's token budget is nearly spent and everyone is answered from the knowledge base",
            registry=r,
        )
        self.tokens_today = Gauge(
            "support_tokens_today", "Provider tokens charged today (reserved or reported), across processes", registry=r
        )
        self.budget_limited = Counter(
            "support_budget_limited",
            "Messages answered from the knowledge base (or, per session, refused) because a token budget was spent",
            ["scope"],
            registry=r,
        )
        self.prompt_trimmed = Counter("support_prompt_trimmed", "Prompts shortened to fit MAX_PROMPT_TOKENS", registry=r)
        self.citations_dropped = Counter(
            "support_citations_dropped",
            "Citations of knowledge-base entries an answer's prompt did not list (dropped from the text, never a source)",
            ["provider"],
            registry=r,
        )
        self._provider_children: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._children: dict[tuple[int, str], Any] = {}

    def record_attempt(self, provider: str, failed: bool, seconds: float) -> None:
        """One provider attempt finished."""
        requests, failures, latency, _ = self._per_provider(provider)
        requests.inc()
        if failed:
            failures.inc()
        latency.observe(seconds)

    def first_token(self, provider: str, seconds: float) -> None:
        """A provider's first delta arrived."""
        self._per_provider(provider)[3].observe(seconds)

    def _per_provider(self, provider: str) -> tuple[Any, Any, Any, Any]:
        """The labelled children, looked up once per provider (labels() is not free on the hot path)."""
        children = self._provider_children.get(provider)
        if children is None:
            children = self._provider_children[provider] = (
                self.provider_requests.labels(provider),
                self.provider_failures.labels(provider),
                self.provider_latency.labels(provider),
                self.time_to_first_token.labels(provider),
            )
        return children

    def child(self, metric: Any, label: str) -> Any:
        """`metric.labels(label)`, looked up once (labels() takes a lock and builds a tuple each call)."""
        key = (id(metric), label)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(label)
        return found

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        """The text exposition, after refreshing gauges computed at scrape time."""
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
