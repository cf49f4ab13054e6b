"""Typed keys for the services stored on the aiohttp app."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import socketio
from aiohttp import web

from server.settings import Settings

if TYPE_CHECKING:  # services never import this module, but some import each other: types only, no cycle
    from server.ai.chain import ProviderChain
    from server.ai.hybrid import HybridRetriever
    from server.chat.service import ChatService
    from server.handoff.directory import AgentDirectory
    from server.handoff.service import HandoffService
    from server.ops.health import HealthService
    from server.ops.metrics import Metrics
    from server.realtime.agents import AgentEvents
    from server.realtime.customers import CustomerEvents
    from server.schemas import Schemas
    from server.storage.bundle import Storage
    from server.storage.redis import EmbeddedRedis
    from server.web.rate_limits import RateLimits

# Real types, never a string (which makes the key Any): `app[KEY]` is typed wherever it is read.
SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
EMBEDDED_REDIS: web.AppKey[EmbeddedRedis | None] = web.AppKey("embedded_redis")
SIO = web.AppKey("sio", socketio.AsyncServer)
SCHEMAS: web.AppKey[Schemas] = web.AppKey("schemas")
STORAGE: web.AppKey[Storage] = web.AppKey("storage")
CHAIN: web.AppKey[ProviderChain] = web.AppKey("chain")
RETRIEVER: web.AppKey[HybridRetriever] = web.AppKey("retriever")
CHAT_SERVICE: web.AppKey[ChatService] = web.AppKey("chat_service")
CUSTOMER_EVENTS: web.AppKey[CustomerEvents] = web.AppKey("customer_events")
HEALTH: web.AppKey[HealthService] = web.AppKey("health")
HANDOFF: web.AppKey[HandoffService] = web.AppKey("handoff")
AGENT_DIRECTORY: web.AppKey[AgentDirectory] = web.AppKey("agent_directory")
AGENT_EVENTS: web.AppKey[AgentEvents] = web.AppKey("agent_events")
RATE_LIMITS: web.AppKey[RateLimits] = web.AppKey("rate_limits")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
OPENAPI = web.AppKey("openapi", dict[str, Any])
OPEN_WEBSOCKETS = web.AppKey("open_websockets", set[asyncio.BaseTransport])
