"""The app factory: builds every service once and wires them onto one aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Middleware
from loguru import logger

from server.ai.chain import ProviderChain
from server.ai.http import ProviderHTTP
from server.ai.hybrid import HybridRetriever
from server.ai.knowledge import KnowledgeBase
from server.ai.providers.base import AIProvider
from server.ai.providers.gemini_direct import GeminiDirectProvider
from server.ai.providers.local import LocalProvider
from server.ai.providers.openai_direct import OpenAIDirectProvider
from server.ai.retrieval import Retriever
from server.app_keys import (
    AGENT_DIRECTORY,
    AGENT_EVENTS,
    CHAIN,
    CHAT_SERVICE,
    CUSTOMER_EVENTS,
    EMBEDDED_REDIS,
    HANDOFF,
    HEALTH,
    METRICS,
    OPEN_WEBSOCKETS,
    OPENAPI,
    RATE_LIMITS,
    REDIS,
    RETRIEVER,
    SCHEMAS,
    SETTINGS,
    SIO,
    STORAGE,
)
from server.chat.budgets import BudgetPolicy, Budgets
from server.chat.escalation import EscalationRules, Escalations
from server.chat.language import LanguageDetection
from server.chat.leases import ReplyLeases
from server.chat.mood_model import MoodModel
from server.chat.prompt import PromptBuilder
from server.chat.reply_stream import ReplyStreams
from server.chat.responder import Finisher, ReplyWriter, Responder
from server.chat.sentiment import SentimentReader
from server.chat.service import ChatService
from server.chat.turns import TurnQueue
from server.handoff.directory import AgentDirectory
from server.handoff.service import HandoffService
from server.handoff.summary import ConversationSummarizer
from server.json_codec import SocketIOCodec
from server.ops.health import Gauges, HealthService
from server.ops.logging import configure_logging
from server.ops.metrics import Metrics
from server.realtime.agents import AgentEvents
from server.realtime.customers import CustomerEvents
from server.realtime.emitter import Emitter
from server.realtime.managers import DirectEmitManager, GuardedRedisManager
from server.realtime.server import ChatSocketServer
from server.realtime.transport_guard import connection_guard
from server.schemas import build_schemas
from server.settings import Settings
from server.storage.bundle import Storage
from server.storage.redis import EmbeddedRedis
from server.storage.spool import Spool
from server.storage.write_behind import WriteBehindStore
from server.web.middleware import (
    access_log_middleware,
    body_read_timeout_middleware,
    cors_middleware,
    errors_middleware,
    websocket_registry_middleware,
)
from server.web.openapi import build_openapi
from server.web.pages import setup_pages
from server.web.rate_limits import RateLimits
from server.web.routes import add_routes


def build_providers(
    settings: Settings, knowledge: KnowledgeBase | Retriever, http: ProviderHTTP | None = None
) -> list[AIProvider]:
    """The providers named in AI_PROVIDERS, in that order, each on its transport (OPENAI_CLIENT, GEMINI_CLIENT)."""
    pool = http or ProviderHTTP()
    for setting, value in (("OPENAI_CLIENT", settings.openai_client), ("GEMINI_CLIENT", settings.gemini_client)):
        if value not in ("direct", "sdk"):
            raise ValueError(f"Unknown transport {value!r} in {setting} (use direct or sdk).")

    def openai_provider() -> AIProvider:
        args = (settings.openai_api_key.reveal(), settings.openai_model, settings.openai_base_url, settings.ai_request_timeout)
        if settings.openai_client == "direct":
            return OpenAIDirectProvider(pool, *args)
        from server.ai.providers.openai_provider import OpenAIProvider  # the SDK is imported only when chosen

        return OpenAIProvider(*args)

    def gemini_provider() -> AIProvider:
        args = (settings.gemini_api_key.reveal(), settings.gemini_model, settings.gemini_base_url, settings.ai_request_timeout)
        if settings.gemini_client == "direct":
            return GeminiDirectProvider(pool, *args)
        from server.ai.providers.gemini_provider import GeminiProvider  # the SDK is imported only when chosen

        return GeminiProvider(*args)

    factories = {"openai": openai_provider, "gemini": gemini_provider, "local": lambda: LocalProvider(knowledge)}
    providers: list[AIProvider] = []
    for name in settings.ai_providers:
        if name not in factories:
            raise ValueError(f"Unknown provider {name!r} in AI_PROVIDERS (use openai, gemini, local).")
        providers.append(factories[name]())
    return providers


def build_mood_model(settings: Settings, http: ProviderHTTP, metrics: Metrics) -> MoodModel | None:
    """SENTIMENT_MODEL=provider: OPENAI_MODEL also scores each visitor message (without a key the lexicon decides)."""
    if settings.sentiment_model not in ("lexicon", "provider"):
        raise ValueError(f"Unknown SENTIMENT_MODEL {settings.sentiment_model!r} (use lexicon or provider).")
    if settings.sentiment_model == "lexicon":
        return None
    if not settings.openai_api_key:
        logger.debug("SENTIMENT_MODEL=provider without OPENAI_API_KEY: the lexicon decides")
    return MoodModel(
        http,
        settings.openai_api_key.reveal(),
        settings.openai_model,
        settings.openai_base_url,
        timeout=settings.sentiment_model_timeout,
        record_attempt=metrics.record_attempt,
    )


def create_app(settings: Settings) -> web.Application:
    """Everything the server needs, wired once; start-up and clean-up hooks own the I/O."""
    configure_logging(settings)
    open_websockets: set[asyncio.BaseTransport] = set()
    middlewares: list[Middleware] = [
        websocket_registry_middleware(open_websockets),
        errors_middleware,
        access_log_middleware,
        cors_middleware(settings.cors_origins),
        body_read_timeout_middleware(settings.request_read_timeout),
    ]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[OPEN_WEBSOCKETS] = open_websockets

    embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
    redis_url = settings.redis_url or embedded.url  # type: ignore[union-attr]
    # A blocking pool: under a burst, callers wait for a connection instead of failing with MaxConnectionsError.
    # No read timeout (socket_timeout=None): redis-py 8.1's read-timeout context swallows task cancellation
    # in about a third of cancelled calls (measured), which broke stop-generation and shutdown; dead peers
    # are found by TCP keepalive and the periodic health check instead.
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url,
        max_connections=64,
        timeout=10,
        socket_connect_timeout=5,
        socket_timeout=None,
        health_check_interval=15,
        **({} if redis_url.startswith("unix://") else {"socket_keepalive": True}),
    )
    redis = aioredis.Redis(connection_pool=pool)
    app[EMBEDDED_REDIS] = embedded
    app[REDIS] = redis

    redis_manager = GuardedRedisManager(settings.redis_url) if settings.scaled_out and settings.redis_url else None
    sio = ChatSocketServer(
        client_manager=redis_manager or DirectEmitManager(),
        async_mode="aiohttp",
        cors_allowed_origins=list(settings.cors_origins) or None,
        max_http_buffer_size=max(settings.socket_max_packet_bytes, settings.max_message_length * 4 + 4096),
        connect_timeout=settings.socket_connect_timeout,
        ws_compression=settings.ws_compression,  # refused where each WebSocket is made (realtime/engine_socket.py)
        json=SocketIOCodec,
        logger=False,
        engineio_logger=False,
    )
    sio.attach(app)
    app[SIO] = sio

    metrics = Metrics()
    app[METRICS] = metrics
    metrics.engine_connections.set_function(lambda: sio.engine_connections)
    knowledge = KnowledgeBase.from_directory(settings.knowledge_dir, store_name=settings.store_name)
    storage = Storage.open(
        redis,
        settings.session_ttl_seconds,
        max_history=settings.max_history_per_session,
        tickets_per_client_per_hour=settings.tickets_per_client_per_hour,
        token_reuse_grace=settings.token_reuse_grace,
    )
    app[STORAGE] = storage
    provider_http = ProviderHTTP()  # the direct providers' keep-alive pool, opened and closed with the app
    # One retrieval per user message (hybrid bm25 + embeddings, calibrated): the prompt, the offline provider, the
    # message's sources and the escalation rules all read it.
    retriever = HybridRetriever.from_settings(settings, knowledge, provider_http)
    app[RETRIEVER] = retriever
    chain = ProviderChain(
        build_providers(settings, retriever, provider_http),
        settings.failover,
        record_attempt=metrics.record_attempt,
        on_first_token=metrics.first_token,
    )
    schemas = build_schemas(settings.max_message_length, settings.metadata_max_bytes)
    instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    emitter = Emitter(sio)
    handoff = HandoffService(
        storage=storage,
        emitter=emitter,
        summarizer=ConversationSummarizer(chain, storage.messages, storage.analytics),
        settings=settings.handoff,
        instance_id=instance_id,
        metrics=metrics,
    )
    store = WriteBehindStore(
        storage.messages,
        capacity=settings.write_behind_capacity,
        spool=Spool(settings.data_dir / "spool", instance_id),
        lease_owner=instance_id,
    )
    # The chat: turn queue -> responder (store, answer, announce); see server/chat/service.py.
    chat_settings = settings.chat
    leases = ReplyLeases(storage.messages, owner=instance_id, seconds=chat_settings.lease_seconds)
    escalations = Escalations(
        EscalationRules.from_settings(settings.escalation, SentimentReader()),
        sessions=storage.sessions,
        tickets=storage.tickets,
        store=store,
        emitter=emitter,
        metrics=metrics,
        handoff=handoff,
    )
    finisher = Finisher(store=store, emitter=emitter, escalations=escalations, leases=leases, metrics=metrics)
    languages = LanguageDetection(
        settings.languages,
        min_confidence=settings.language_min_confidence,
        min_margin=settings.language_min_margin,
        low_accuracy=settings.language_accuracy == "low",
    )
    languages.warm_up()  # lingua's models load in a background thread (once per process), not on a first visitor
    writer = ReplyWriter(
        chain=chain,
        retriever=retriever,
        prompts=PromptBuilder(
            settings.system_prompt_file,
            retriever,
            store_name=settings.store_name,
            tone=settings.assistant_tone,
            top_k=settings.knowledge_in_prompt,
        ),
        budgets=Budgets(storage.rate_limits, storage.sessions, BudgetPolicy.from_settings(settings), metrics),
        streams=ReplyStreams(emitter, storage.messages, chat_settings.streaming),
        store=store,
        finisher=finisher,
        settings=chat_settings,
        languages=languages,
        moods=build_mood_model(settings, provider_http, metrics),
    )
    responder = Responder(
        writer=writer,
        finisher=finisher,
        store=store,
        messages=storage.messages,
        leases=leases,
        metrics=metrics,
        settings=chat_settings,
    )
    chat = ChatService(
        turns=TurnQueue(responder.handle, messages=storage.messages, store=store, owner=instance_id, settings=chat_settings),
        writer=writer,
        escalations=escalations,
        leases=leases,
        storage=storage,
        store=store,
        settings=chat_settings,
    )
    limits = RateLimits(
        storage.rate_limits,
        sessions_per_minute=settings.rate_limit_sessions_per_minute,
        messages_per_minute=settings.rate_limit_messages_per_minute,
        connections_per_minute=settings.rate_limit_connections_per_minute,
        trusted_proxies=settings.trusted_proxies,
        events_per_minute=settings.rate_limit_events_per_minute,
        pending_per_client=settings.max_pending_per_client,
    )
    app[RATE_LIMITS] = limits
    sio.eio.guard = connection_guard(limits, lambda reason: metrics.transport_refusals.labels(reason).inc())
    customers = CustomerEvents(
        sio,
        emitter,
        schemas,
        storage=storage,
        chat=chat,
        tickets=handoff.tickets,
        limits=limits,
    )
    customers.register()
    directory = AgentDirectory(settings.agent_api_keys)
    agents = AgentEvents(sio, emitter, schemas, directory, handoff)
    agents.register()
    app[HANDOFF] = handoff
    app[AGENT_DIRECTORY] = directory
    app[AGENT_EVENTS] = agents
    app[SCHEMAS] = schemas
    app[OPENAPI] = build_openapi(schemas)
    app[CHAIN] = chain
    app[CHAT_SERVICE] = chat
    app[CUSTOMER_EVENTS] = customers
    gauges = Gauges(
        connected_clients=lambda: customers.connected,
        engine_connections=lambda: sio.engine_connections,
        pubsub_healthy=(lambda: redis_manager.healthy) if redis_manager is not None else None,
    )
    app[HEALTH] = HealthService(
        storage,
        chain,
        gauges,
        instance_id=instance_id,
        redis_mode=settings.redis_mode,
        token_budget_per_day=settings.token_budget_per_day,
        write_behind=store,
    )

    add_routes(app)
    setup_pages(app)
    app.cleanup_ctx.append(provider_http.lifecycle)  # before _lifecycle: opened first, closed after the providers
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_graceful_shutdown)
    return app


async def _graceful_shutdown(app: web.Application) -> None:
    """No longer listening (aiohttp closed the listener first): drain, then close every socket at once.

    Replies being written get up to SHUTDOWN_GRACE to finish and be stored (then they are stored as incomplete);
    messages not yet stored are refused so their clients retry; the timers stop; every socket's transport is
    closed at once, which socket.io clients answer by reconnecting (elsewhere, or here when it is back).
    """
    settings = app[SETTINGS]
    chat = app[CHAT_SERVICE]
    logger.info(
        "shutdown began: no new connections; {} replies in flight get up to {:g} s; {} sockets will be closed",
        len(chat.generating),
        settings.shutdown_grace,
        len(app[SIO].eio.sockets),
    )
    app[HANDOFF].stop_sweeper()
    await chat.drain(timeout=settings.shutdown_grace)
    await chat.store.drain(timeout=2)
    sio = app[SIO]
    if sio.eio.sockets:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sio.eio.disconnect(), 1)
    for transport in [*app[OPEN_WEBSOCKETS]]:
        transport.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sio.shutdown(), 1)
    logger.info("shutdown: sockets closed, stopping background tasks")


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start embedded Redis before serving; on the way out, let replies finish, then close clients."""
    embedded = app[EMBEDDED_REDIS]
    if embedded is not None:
        await embedded.start()
    settings = app[SETTINGS]
    for provider in app[CHAIN].providers:
        provider.warm_up()
    app[RETRIEVER].warm_up()  # with EMBEDDINGS=openai: the entries' remote vectors, in the background
    logger.info(
        "serving on {}:{} with providers {} (redis {})",
        settings.host,
        settings.port,
        ",".join(app[CHAIN].usable_names) or "none",
        settings.redis_mode,
    )
    adopted = app[CHAT_SERVICE].store.adopt_orphans()
    if adopted:
        logger.warning("{} buffered writes from a process that stopped will be written to Redis", adopted)
    app[CHAT_SERVICE].start()
    sio = app[SIO]
    if not sio.manager_initialized:
        # python-socketio starts its manager on the first connection; started now, the Redis manager's pub/sub
        # (and its probe, which /health/ready reads) works before any visitor arrives.
        sio.manager_initialized = True
        sio.manager.initialize()
    if isinstance(sio.manager, GuardedRedisManager) and not await sio.manager.wait_until_healthy(5):
        logger.warning("socket.io pub/sub does not deliver yet: readiness says degraded until it does")
    sweeper = asyncio.create_task(app[HANDOFF].run_sweeper(), name="handoff-sweeper")
    yield
    app[HANDOFF].stop_sweeper()
    await app[CHAT_SERVICE].aclose()
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(sweeper, 5)
    await app[HANDOFF].aclose()
    for provider in app[CHAIN].providers:
        await provider.aclose()
    await app[RETRIEVER].aclose()
    manager = app[SIO].manager
    if isinstance(manager, GuardedRedisManager):
        await manager.aclose()
    await app[STORAGE].aclose()  # the hot path's shared connection
    await app[REDIS].aclose()
    if embedded is not None:
        await embedded.stop()
    logger.info("shutdown complete")
