"""The visitor's Socket.IO edge: validate, call one service method, then ack or emit."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from loguru import logger

from server.chat.service import ChatService
from server.errors import ApiError, api_error_from
from server.handoff.tickets import TicketDesk
from server.json_codec import MalformedPayload
from server.realtime.emitter import Emitter
from server.realtime.server import ack_requested, after_ack
from server.schemas import Schemas, load
from server.storage.bundle import Storage
from server.storage.errors import STORAGE_DOWN, StorageError
from server.web.rate_limits import RateLimits

HISTORY_ON_JOIN = 50
AGENT_ONLY_EVENTS = ("claim", "release", "close", "agent-message", "get-queue")
SocketHandler = Callable[[str, Any], Awaitable[dict[str, Any]]]


def socket_edge(
    sio: socketio.AsyncServer, event: str, handler: SocketHandler, namespace: str = "/"
) -> Callable[..., Awaitable[dict[str, Any]]]:
    """Wrap a handler: one payload argument, the contract's ack shape, `chat-error` when no ack was asked."""

    async def handle(sid: str, *args: Any) -> dict[str, Any]:
        started = time.perf_counter()
        payload = args[0] if len(args) == 1 else None
        session_id = payload.get("sessionId") if isinstance(payload, dict) else None
        with logger.contextualize(sid=sid, session=session_id):
            try:
                if isinstance(payload, MalformedPayload):
                    raise ApiError("validation_error", "The payload must be valid JSON.", {"payload": payload.reason})
                if _has_binary(args):
                    raise ApiError("validation_error", "Binary attachments are not accepted.")
                answer = {"ok": True, **await handler(sid, payload)}
            except (ApiError, StorageError, *STORAGE_DOWN) as exc:  # ours, and storage's mapped to the contract's
                err = api_error_from(exc) or ApiError("internal", "Something went wrong.")
                answer = {"ok": False, "error": err.to_dict()}
                if err.retry_after is not None:
                    answer["retryAfter"] = err.retry_after
            except Exception:
                logger.exception("socket event {} failed", event)
                answer = {"ok": False, "error": ApiError("internal", "Something went wrong.").to_dict()}
            logger.info(
                "socket {}{} session={} -> {} in {:.1f} ms",
                "" if namespace == "/" else namespace + " ",
                event,
                answer.get("sessionId", session_id),
                "ok" if answer["ok"] else answer["error"]["code"],
                (time.perf_counter() - started) * 1000,
            )
        if not answer["ok"] and not ack_requested():
            await sio.emit("chat-error", {"event": event, "error": answer["error"]}, to=sid, namespace=namespace)
        return answer

    return handle


def _has_binary(value: Any) -> bool:
    """Socket.IO binary attachments arrive as bytes anywhere in the payload; chat is text only."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    if isinstance(value, dict):
        return any(_has_binary(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_binary(v) for v in value)
    return False


class CustomerEvents:
    """Handlers for the default namespace; which sessions a socket joined lives in its socket session."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        emitter: Emitter,
        schemas: Schemas,
        *,
        storage: Storage,
        chat: ChatService,
        tickets: TicketDesk,
        limits: RateLimits,
    ) -> None:
        self.sio = sio
        self.emitter = emitter
        self.schemas = schemas
        self.storage = storage
        self.chat = chat
        self.tickets = tickets
        self.limits = limits
        self.connected = 0
        self._socket_ips: dict[str, str] = {}  # connected socket -> client IP (read without awaiting)

    def register(self) -> None:
        """Attach every handler to the server."""
        self.sio.on("connect", self.on_connect)
        self.sio.on("disconnect", self.on_disconnect)
        handlers: dict[str, Callable[[str, Any], Awaitable[dict[str, Any]]]] = {
            "join-chat": self.join_chat,
            "send-message": self.send_message,
            "escalate": self.escalate,
            "stop-generation": self.stop_generation,
            "provide-contact": self.provide_contact,
            "feedback": self.feedback,
        }
        for event in AGENT_ONLY_EVENTS:
            handlers[event] = self.agent_only
        for event, handler in handlers.items():
            self.sio.on(event, socket_edge(self.sio, event, handler))

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        request = environ.get("aiohttp.request")
        # One string per address, however many sockets come from it (each socket keeps it while it lives).
        ip = sys.intern(self.limits.client_ip(getattr(request, "remote", None), environ.get("HTTP_X_FORWARDED_FOR")))
        # The per-IP connection limit is counted at the Engine.IO handshake (server/transport_guard.py).
        self.connected += 1
        self._socket_ips[sid] = ip
        # The sessions a socket joined, as a tuple: almost always one or none (an empty set costs 216 bytes a socket).
        await self.sio.save_session(sid, {"sessions": (), "ip": ip})

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        self.connected -= 1
        self._socket_ips.pop(sid, None)

    def _listened(self, sid: str, session_id: str) -> Callable[[], bool]:
        """Whether a queued message can still reach anyone: its socket, or another socket in its session's room.

        Local to this process: a socket of the session connected to another process does not count.
        """

        def receivable() -> bool:
            return sid in self._socket_ips or self.emitter.listened_here(session_id)

        return receivable

    async def _event_allowed(self, sid: str, session_id: str) -> None:
        """A joined socket, within RATE_LIMIT_EVENTS_PER_MINUTE for its session."""
        await self._joined(sid, session_id)
        await self.limits.check_event(session_id)

    async def _joined(self, sid: str, session_id: str) -> None:
        """Only sockets that joined a session with its token may act on it."""
        session = await self.sio.get_session(sid)
        if session_id not in session.get("sessions", ()):
            raise ApiError("unauthorized", "Join the session with its token first.")

    async def join_chat(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.join_chat, payload)
        if "sessionId" in data:
            session = await self.storage.sessions.authenticate(data["sessionId"], data["token"])
            await self.limits.check_event(session.id)
            token = await self.chat.rejoined(session.id, data["token"])
        else:
            ip = (await self.sio.get_session(sid)).get("ip", "unknown")
            await self.limits.check_session_creation(ip)
            session, token = await self.storage.sessions.create(data["userId"], data["metadata"], client_ip=ip)
        await self.emitter.join_session(sid, session.id)
        async with self.sio.session(sid) as socket_session:
            joined_here: tuple[str, ...] = socket_session.get("sessions", ())
            if session.id not in joined_here:
                socket_session["sessions"] = (*joined_here, session.id)
        history = await self.chat.history_for_join(session.id, data.get("afterMessageId"), HISTORY_ON_JOIN)
        joined: dict[str, Any] = {
            "sessionId": session.id,
            "userId": session.user_id,
            "history": history,
            "providers": self.chat.providers,
        }
        in_progress = await self.chat.in_progress(session.id, history)
        if in_progress is not None:
            joined["inProgress"] = in_progress

        async def announce() -> None:
            await self.sio.emit("chat-joined", joined, to=sid)

        after_ack(announce)
        return {"sessionId": session.id, "token": token}

    async def send_message(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.send_message, payload)
        session_id = data["sessionId"]

        async def admit() -> None:
            await self._joined(sid, session_id)  # its messages-per-minute limit is counted as it is stored

        # Nothing is awaited before submit takes the message's place in the session's queue: a socket's events
        # run as separate tasks, so arrival order is kept only if the place is taken on arrival.
        with self.limits.waiting_message(self._socket_ips.get(sid, "unknown")):
            stored, _ = await self.chat.submit(
                session_id,
                data["message"],
                data.get("clientMessageId"),
                admit=admit,
                receivable=self._listened(sid, session_id),
            )
        return {"messageId": stored["id"]}

    async def escalate(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.escalate, payload)
        await self._event_allowed(sid, data["sessionId"])
        already = await self.chat.escalate(data["sessionId"], data.get("reason"))
        return {} if already is None else {"state": already}

    async def stop_generation(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.session_ref, payload)
        await self._event_allowed(sid, data["sessionId"])
        return {"stopped": self.chat.stop(data["sessionId"])}

    async def provide_contact(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.provide_contact, payload)
        await self._event_allowed(sid, data["sessionId"])
        ticket = await self.tickets.provide_contact(data["sessionId"], data["email"])
        return {"ticketId": ticket["id"]}

    async def agent_only(self, sid: str, payload: Any) -> dict[str, Any]:
        """Agent events on the customers' namespace are refused: a non-object payload as every event refuses it
        (the contract's validation_error comes first), any other as unauthorized."""
        if not isinstance(payload, dict):
            raise ApiError("validation_error", "The payload must be a JSON object.")
        raise ApiError("unauthorized", "Agent events need the /agents namespace and an agent key.")

    async def feedback(self, sid: str, payload: Any) -> dict[str, Any]:
        data = load(self.schemas.feedback, payload)
        await self._event_allowed(sid, data["sessionId"])
        await self.storage.analytics.record_feedback(data["sessionId"], data["messageId"], data["rating"], data["comment"])
        return {}
