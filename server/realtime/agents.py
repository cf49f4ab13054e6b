"""The agents' Socket.IO edge (`/agents`): key checked at connect, then thin handlers over HandoffService."""

from __future__ import annotations

import math
from typing import Any

import socketio
from loguru import logger

from server.errors import ApiError
from server.handoff.directory import AgentDirectory
from server.handoff.service import HandoffService
from server.realtime.customers import SocketHandler, socket_edge
from server.realtime.emitter import AGENTS_NAMESPACE, Emitter
from server.schemas import Schemas, load
from server.web.auth_throttle import AuthThrottle


class AgentEvents:
    """Handlers for support agents; customers can never connect here without an agent key."""

    def __init__(
        self, sio: socketio.AsyncServer, emitter: Emitter, schemas: Schemas, directory: AgentDirectory, handoff: HandoffService
    ) -> None:
        self.sio = sio
        self.emitter = emitter
        self.schemas = schemas
        self.directory = directory
        self.handoff = handoff

    def register(self) -> None:
        """Attach every handler to the /agents namespace."""
        self.sio.on("connect", self.on_connect, namespace=AGENTS_NAMESPACE)
        self.sio.on("disconnect", self.on_disconnect, namespace=AGENTS_NAMESPACE)
        handlers: dict[str, SocketHandler] = {
            "get-queue": self.get_queue,
            "claim": self.claim,
            "release": self.release,
            "close": self.close,
            "agent-message": self.agent_message,
        }
        for event, handler in handlers.items():
            self.sio.on(event, socket_edge(self.sio, event, handler, AGENTS_NAMESPACE), namespace=AGENTS_NAMESPACE)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        """Refuse the connection unless the auth payload carries a valid agent key (guessing is throttled per address)."""
        key = None
        if isinstance(auth, dict):
            key = auth.get("key") or auth.get("token") or auth.get("apiKey")
        request = environ["aiohttp.request"]
        ip = AuthThrottle.client_ip(request.app, request.remote, environ.get("HTTP_X_FORWARDED_FOR"))
        try:
            name = await AuthThrottle.for_app(request.app).authenticate(
                ip,
                f"socket {AGENTS_NAMESPACE}",
                "agent key",
                lambda: self.directory.name_for(key),
                ApiError("unauthorized", "A valid agent key is required."),
            )
        except ApiError as err:
            # Two arguments: the client's connect_error gets `message` and `data` = {code, message[, retryAfter]}, so
            # a page can tell a refused key (data.code == "unauthorized") from a lockout (data.code == "rate_limited",
            # retry after data.retryAfter seconds) and from a server it cannot reach.
            data: dict[str, Any] = err.to_dict()
            if err.retry_after is not None:
                data["retryAfter"] = max(1, math.ceil(err.retry_after))
            raise socketio.exceptions.ConnectionRefusedError(err.message, data) from None
        await self.sio.save_session(sid, {"agent": name}, namespace=AGENTS_NAMESPACE)
        await self.emitter.join_agents(sid)
        await self.handoff.agent_connected(sid, name)
        # A reconnecting agent (page reload, server restart) goes back into the conversations it holds.
        for session_id in await self.handoff.held_by(name):
            await self.emitter.join_held(sid, session_id)
        logger.info("agent {} connected", name)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        await self.handoff.agent_disconnected(sid)

    async def _agent(self, sid: str) -> str:
        session = await self.sio.get_session(sid, namespace=AGENTS_NAMESPACE)
        name: str | None = session.get("agent") if session else None
        if not name:
            raise ApiError("unauthorized", "A valid agent key is required.")
        return name

    async def get_queue(self, sid: str, payload: Any) -> dict[str, Any]:
        await self._agent(sid)
        return {"queue": await self.handoff.queue(), "agentName": await self._agent(sid)}

    async def claim(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.agent_session, payload)
        result = await self.handoff.claim(await self._agent(sid), data["sessionId"])
        await self.emitter.join_held(sid, data["sessionId"])
        return result

    async def release(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.agent_session, payload)
        await self.handoff.release(await self._agent(sid), data["sessionId"])
        await self.emitter.leave_held(sid, data["sessionId"])
        return {"sessionId": data["sessionId"]}

    async def close(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.agent_close, payload)
        await self.handoff.close(await self._agent(sid), data["sessionId"], data["resolution"])
        await self.emitter.leave_held(sid, data["sessionId"])
        return {"sessionId": data["sessionId"]}

    async def agent_message(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.agent_message, payload)
        message = await self.handoff.agent_message(await self._agent(sid), data["sessionId"], data["message"])
        return {"messageId": message["id"], "sessionId": data["sessionId"]}
