"""Typed keys for the services stored on the aiohttp app."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import socketio
from aiohttp import web

from server.settings import Settings

if TYPE_CHECKING:
    pass

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
EMBEDDED_REDIS = web.AppKey("embedded_redis", "EmbeddedRedis | None")
SIO = web.AppKey("sio", socketio.AsyncServer)
SCHEMAS = web.AppKey("schemas", "Schemas")
SESSIONS = web.AppKey("sessions", "SessionManager")
CHAIN = web.AppKey("chain", "ProviderChain")
CHAT_SERVICE = web.AppKey("chat_service", "ChatService")
CUSTOMER_EVENTS = web.AppKey("customer_events", "CustomerEvents")
HEALTH = web.AppKey("health", "HealthService")
HANDOFF = web.AppKey("handoff", "HandoffService")
AGENT_DIRECTORY = web.AppKey("agent_directory", "AgentDirectory")
AGENT_EVENTS = web.AppKey("agent_events", "AgentEvents")
RATE_LIMITS = web.AppKey("rate_limits", "RateLimits")
METRICS = web.AppKey("metrics", "Metrics")
OPENAPI = web.AppKey("openapi", dict)
OPEN_WEBSOCKETS = web.AppKey("open_websockets", set)
