"""The REST edge under /api/v1: validate, call one service method, answer JSON."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response
from loguru import logger

from server import json_codec
from server.app_keys import (
    AGENT_DIRECTORY,
    CHAIN,
    CHAT_SERVICE,
    CUSTOMER_EVENTS,
    HANDOFF,
    HEALTH,
    METRICS,
    OPENAPI,
    RATE_LIMITS,
    SCHEMAS,
    SETTINGS,
    STORAGE,
)
from server.chat.reply_stream import StreamEvent
from server.errors import ApiError, unauthorized
from server.ops.metrics import BREAKER_VALUES, CONTENT_TYPE
from server.schemas import load
from server.settings import Secret
from server.storage.errors import STORAGE_DOWN
from server.web.auth_throttle import AuthThrottle


def bearer_token(request: web.Request) -> str | None:
    """The token from `Authorization: Bearer <token>`, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def json_body(request: web.Request) -> Any:
    """The parsed body under the server's JSON policy (server/json_codec.py), whatever the Content-Type.

    JSON the policy refuses, or a body that cannot be read (a broken gzip/deflate Content-Encoding), is the
    client's validation error; a body over the size limit is payload_too_large (413).
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = f"At most {request.client_max_size} bytes."
        raise ApiError("payload_too_large", f"The request body is too large. {limit}", {"body": limit}) from None
    except web.RequestPayloadError as err:
        reason = str(getattr(err.__cause__, "message", "") or "The body is malformed.")
        raise ApiError("validation_error", "The body could not be read.", {"body": reason}) from None
    if not raw:
        return None
    try:
        return json_codec.loads(raw)
    except json_codec.InvalidJson as err:
        raise ApiError("validation_error", "The body must be valid JSON.", {"body": str(err)}) from None


async def create_session(request: web.Request) -> web.Response:
    data = load(request.app[SCHEMAS].create_session, await json_body(request))
    limits = request.app[RATE_LIMITS]
    ip = limits.client_ip(request.remote, request.headers.get("X-Forwarded-For"))
    await limits.check_session_creation(ip)
    session, token = await request.app[STORAGE].sessions.create(data["userId"], data["metadata"], client_ip=ip)
    return web.json_response(
        {
            "sessionId": session.id,
            "userId": session.user_id,
            "token": token,
            "createdAt": session.created_at,
            "expiresAt": session.expires_at,
        },
        status=201,
    )


SESSION_TOKEN_HEADER = "X-Session-Token"
_ROTATED_TOKEN = web.RequestKey("support.rotatedSessionToken", str)  # the token that replaced the presented one


async def authenticate_session(request: web.Request, session_id: str, *, rotate: bool = True) -> None:
    """The session's own Bearer token; after an idle spell (TOKEN_ROTATE_AFTER) it is replaced by a new one.

    The new token travels back in the `X-Session-Token` response header (on whatever answer follows); the old
    one stops working, and presenting it again after TOKEN_REUSE_GRACE revokes every token of the session.
    """
    token = bearer_token(request)
    sessions = request.app[STORAGE].sessions
    await sessions.authenticate(session_id, token)
    if not rotate or token is None:
        return
    try:
        new_token = await sessions.rotate_token_if_idle(session_id, token, request.app[SETTINGS].token_rotate_after)
    except STORAGE_DOWN:  # verified from this process's memory during an outage: the visitor keeps its token
        return
    if new_token is not None:
        request[_ROTATED_TOKEN] = new_token


async def _hand_back_token(request: web.Request, response: web.StreamResponse) -> None:
    """Put a rotated session token on the answer (never cached; readable by allowed cross-origin pages)."""
    token = request.get(_ROTATED_TOKEN)
    if not token:
        return
    response.headers[SESSION_TOKEN_HEADER] = token
    response.headers["Cache-Control"] = "no-store"
    if "Access-Control-Allow-Origin" in response.headers:
        exposed = response.headers.get("Access-Control-Expose-Headers")
        exposed = f"{exposed}, {SESSION_TOKEN_HEADER}" if exposed else SESSION_TOKEN_HEADER
        response.headers["Access-Control-Expose-Headers"] = exposed


async def _admit_message(request: web.Request, session_id: str) -> None:
    """The session's own token (a token verified here before passes in an outage); the rate limit is counted as the
    message is stored (ChatSettings.messages_per_minute)."""
    if bearer_token(request) is None:
        raise unauthorized()
    await authenticate_session(request, session_id)


async def send_message(request: web.Request) -> web.Response:
    data = load(request.app[SCHEMAS].send_message, await json_body(request))
    # The message's place in its session's queue is taken on arrival, before authentication is awaited.
    _, done = await request.app[CHAT_SERVICE].submit(
        data["sessionId"],
        data["message"],
        data.get("clientMessageId"),
        admit=lambda: _admit_message(request, data["sessionId"]),
    )
    result = await done
    return web.json_response(
        {
            "sessionId": result.session_id,
            "userMessage": result.user_message,
            "reply": result.reply,
            "escalation": result.escalation,
        }
    )


async def send_message_stream(request: web.Request) -> web.StreamResponse:
    """The streaming twin of send_message: Server-Sent Events `accepted`, `chunk`, `interrupted`, `done`, `error`."""
    data = load(request.app[SCHEMAS].send_message, await json_body(request))
    early: list[tuple[str, StreamEvent]] = []  # what the reply sent before the event stream was open
    opened: list[Any] = []

    async def forward(kind: str, payload: StreamEvent) -> None:
        if kind not in ("chunk", "interrupted"):
            return
        if not opened:
            early.append((kind, payload))
            return
        await opened[0].send(json.dumps(payload), event=kind)

    stored, done = await request.app[CHAT_SERVICE].submit(
        data["sessionId"],
        data["message"],
        data.get("clientMessageId"),
        listener=forward,
        admit=lambda: _admit_message(request, data["sessionId"]),
    )
    async with sse_response(request, allow_all_methods=True) as sse:
        await sse.send(json.dumps({"userMessage": stored}), event="accepted")
        for kind, payload in early:
            await sse.send(json.dumps(payload), event=kind)
        opened.append(sse)
        try:
            result = await done
            await sse.send(
                json.dumps(
                    {
                        "sessionId": result.session_id,
                        "userMessage": result.user_message,
                        "reply": result.reply,
                        "escalation": result.escalation,
                    }
                ),
                event="done",
            )
        except ApiError as err:
            await sse.send(json.dumps({"error": err.to_dict()}), event="error")
    return sse


async def history(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    query = load(request.app[SCHEMAS].history_query, dict(request.query))
    await authenticate_session(request, session_id)
    page = await request.app[STORAGE].messages.history(session_id, query["limit"], query.get("before"))
    return web.json_response({"sessionId": session_id, "messages": page.messages, "hasMore": page.has_more})


async def health(request: web.Request) -> web.Response:
    report = await request.app[HEALTH].report()
    return web.json_response(report, status=503 if report["status"] == "down" else 200)


async def delete_session(request: web.Request) -> web.Response:
    """The person's right to be forgotten; logged as an audit event without content."""
    session_id = request.match_info["session_id"]
    await authenticate_session(request, session_id, rotate=False)
    await request.app[STORAGE].delete(session_id)
    logger.info("audit: session {} deleted by its owner", session_id)
    return web.json_response({"sessionId": session_id, "deleted": True})


async def export_session(request: web.Request) -> web.Response:
    """Everything kept about a session, as JSON; logged as an audit event without content."""
    session_id = request.match_info["session_id"]
    await authenticate_session(request, session_id)
    logger.info("audit: session {} exported by its owner", session_id)
    return web.json_response(await request.app[STORAGE].export(session_id))


async def feedback(request: web.Request) -> web.Response:
    """Thumbs up or down on a reply, counted in analytics."""
    data = load(request.app[SCHEMAS].feedback, await json_body(request))
    await authenticate_session(request, data["sessionId"])
    entry = await request.app[STORAGE].analytics.record_feedback(
        data["sessionId"], data["messageId"], data["rating"], data["comment"]
    )
    return web.json_response({"sessionId": data["sessionId"], **entry})


async def analytics(request: web.Request) -> web.Response:
    """Per-day figures for the last 30 days (agent key)."""
    await require_agent(request)
    return web.json_response({"days": await request.app[STORAGE].analytics.analytics(30)})


async def require_agent(request: web.Request) -> str:
    """The agent's name for the Bearer agent key; customers' session tokens never pass; guessing is throttled."""
    app = request.app
    return await AuthThrottle.for_app(app).authenticate(
        AuthThrottle.client_ip(app, request.remote, request.headers.get("X-Forwarded-For")),
        f"{request.method} {request.path}",
        "agent key",
        lambda: app[AGENT_DIRECTORY].name_for(bearer_token(request)),
        ApiError("unauthorized", "A valid agent key is required."),
    )


async def list_tickets(request: web.Request) -> web.Response:
    """Tickets newest first, filtered by `status` before the page is cut; `limit` and `cursor` page on."""
    await require_agent(request)
    raw_limit = request.query.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 500:
        raise ApiError("validation_error", "Invalid limit.", {"limit": "A whole number from 1 to 500."})
    page = await request.app[STORAGE].tickets.page(
        limit=int(raw_limit), status=request.query.get("status") or None, cursor=request.query.get("cursor") or None
    )
    tickets = [{k: v for k, v in t.items() if k != "transcript"} for t in page.tickets]
    return web.json_response({"tickets": tickets, "nextCursor": page.next_cursor})


async def show_ticket(request: web.Request) -> web.Response:
    await require_agent(request)
    ticket = await request.app[STORAGE].tickets.get(request.match_info["ticket_id"])
    if ticket is None:
        raise ApiError("not_found", "No such ticket.")
    return web.json_response(ticket)


async def resolve_ticket(request: web.Request) -> web.Response:
    agent = await require_agent(request)
    body = await json_body(request)
    data = load(request.app[SCHEMAS].ticket_resolve, {} if body is None else body)
    ticket = await request.app[HANDOFF].tickets.resolve(request.match_info["ticket_id"], agent, data["resolution"])
    return web.json_response(ticket)


async def liveness(request: web.Request) -> web.Response:
    """The process answers (no I/O): for restart decisions."""
    return web.json_response({"status": "ok"})


async def readiness(request: web.Request) -> web.Response:
    """Redis and (when scaled out) pub/sub reachable: for routing traffic here."""
    ready = await request.app[HEALTH].ready()
    return web.json_response(ready, status=200 if ready["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; with METRICS_TOKEN set, only for that Bearer token."""
    expected = request.app[SETTINGS].metrics_token
    if expected:
        await AuthThrottle.for_app(request.app).authenticate(
            AuthThrottle.client_ip(request.app, request.remote, request.headers.get("X-Forwarded-For")),
            f"{request.method} {request.path}",
            "metrics token",
            lambda: True if Secret(bearer_token(request)) == expected else None,
            ApiError("unauthorized", "A valid metrics token is required."),
        )
    registry = request.app[METRICS]
    chain = request.app[CHAIN]
    try:
        registry.sessions_active.set(await request.app[STORAGE].analytics.active_sessions())
    except STORAGE_DOWN:
        pass

    def refresh() -> None:
        registry.sockets_connected.set(request.app[CUSTOMER_EVENTS].connected)
        registry.write_behind_depth.set(request.app[CHAT_SERVICE].store.depth)
        for name, breaker in chain.breakers.items():
            registry.breaker_state.labels(name).set(BREAKER_VALUES[breaker.state])

    return web.Response(body=registry.render(refresh), headers={"Content-Type": CONTENT_TYPE})


async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document, generated at start-up from the marshmallow schemas."""
    return web.json_response(request.app[OPENAPI])


def add_routes(app: web.Application) -> None:
    """Every REST route in one place, and the hand-back of rotated session tokens."""
    app.on_response_prepare.append(_hand_back_token)
    settings = app[SETTINGS]
    if settings.token_rotate_after is not None and settings.token_rotate_after >= settings.session_ttl_seconds:
        logger.warning(
            "TOKEN_ROTATE_AFTER ({:g} s) is not shorter than SESSION_TIMEOUT ({} s): tokens will never rotate",
            settings.token_rotate_after,
            settings.session_ttl_seconds,
        )
    app.router.add_post("/api/v1/chat/session", create_session)
    app.router.add_post("/api/v1/chat/message", send_message)
    app.router.add_post("/api/v1/chat/message/stream", send_message_stream)
    app.router.add_get("/api/v1/chat/history/{session_id}", history)
    app.router.add_delete("/api/v1/chat/session/{session_id}", delete_session)
    app.router.add_get("/api/v1/chat/session/{session_id}/export", export_session)
    app.router.add_post("/api/v1/chat/feedback", feedback)
    app.router.add_get("/api/v1/analytics", analytics)
    app.router.add_get("/api/v1/openapi.json", openapi_document)
    app.router.add_get("/api/v1/tickets", list_tickets)
    app.router.add_get("/api/v1/tickets/{ticket_id}", show_ticket)
    app.router.add_post("/api/v1/tickets/{ticket_id}/resolve", resolve_ticket)
    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", liveness)
    app.router.add_get("/health/ready", readiness)
    app.router.add_get("/metrics", metrics)
