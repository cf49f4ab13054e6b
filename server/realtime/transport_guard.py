"""Engine.IO's HTTP edge, guarded: the connection limit at the handshake and oversized polling POSTs refused at once."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import engineio
from aiohttp import web
from engineio import exceptions, packet
from loguru import logger

from server.errors import ApiError
from server.realtime.engine_socket import LeanSocket, LeanWebSocket, PacketQueue
from server.web.middleware import error_response, failure_response, is_engineio_websocket
from server.web.rate_limits import RateLimits

Admit = Callable[[web.Request], Awaitable[None]]
ClientIp = Callable[[web.Request], str]
Refused = Callable[[str], None]
PRELOADED_BODY = web.RequestKey("engineio_body", bytes)


class _Preloaded:
    """A read()-able stand-in for the request stream, holding a body already read in full."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self, n: int = -1) -> bytes:
        body, self._body = self._body, b""
        return body


def _peer(request: web.Request) -> str:
    """The peer address, for servers built without the app's proxy-aware lookup."""
    return request.remote or "unknown"


def _ignore(reason: str) -> None:
    """The refusal hook of a guard nobody watches."""


class TransportGuard:
    """What the guard needs from the app: the admission check, the client's address and where refusals go."""

    def __init__(self, admit: Admit | None = None, client_ip: ClientIp = _peer, refused: Refused = _ignore) -> None:
        self.admit = admit
        self.client_ip = client_ip
        self.refused = refused


class GuardedEngineIO(engineio.AsyncServer):
    """engine.io's AsyncServer with two checks before it touches a request.

    A handshake (GET without `sid`) counts against the per-IP connection limit and is refused with 429 before any
    Engine.IO state exists. A long-polling POST whose declared length is over the packet limit (or that declares
    none) is answered 413 at once and its session closed without waiting: engine.io itself would wait forever for a
    GET to drain the session's queue, so the POST hung and kept its buffers. Its sessions are LeanSockets: idle, one
    costs about 7 KB less than engine.io's own (server/realtime/engine_socket.py).
    """

    _async: dict[str, Any]  # engine.io's hooks of its async driver (set by its __init__, untyped)
    start_service_task: bool  # engine.io's: its service task is yet to start
    sid_prefix = ""  # WORKERS above 1: names the worker that holds a session (server/realtime/affinity.py)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = TransportGuard()
        self.ws_compression = False  # permessage-deflate for WebSockets (WS_COMPRESSION)
        self._translate_original = self._async["translate_request"]
        # A copy (the driver's dict is shared), with our environ and our WebSocket (server/realtime/engine_socket.py).
        self._async = {**self._async, "translate_request": self._translate, "websocket": LeanWebSocket}

    def generate_id(self) -> str:
        """engine.io's random session id, after this worker's prefix (none in a single process)."""
        return self.sid_prefix + str(super().generate_id())

    def _translate(self, request: web.Request) -> dict[str, Any]:
        """engine.io's environ, reading the POST body we already read in full (see handle_request).

        A socket keeps its environ while it lives: its keys (`HTTP_SEC_WEBSOCKET_KEY`, ...), built anew for every
        request, are interned so that all sockets share one copy of each.
        """
        environ: dict[str, Any] = {sys.intern(key): value for key, value in self._translate_original(request).items()}
        environ["SERVER_PROTOCOL"] = sys.intern(environ["SERVER_PROTOCOL"])
        body = request.get(PRELOADED_BODY)
        if body is not None:
            environ["wsgi.input"] = _Preloaded(body)
        return environ

    async def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse what must not reach engine.io, then let engine.io handle the rest.

        The app's error middleware lets Engine.IO WebSocket handshakes through (a middleware's frame would live as
        long as the socket), so failures are answered here, in the contract's shape as that middleware would.
        """
        request = args[0] if args else None
        if not isinstance(request, web.Request):
            return await super().handle_request(*args, **kwargs)
        upgrade = is_engineio_websocket(request)
        try:
            sid = request.query.get("sid")
            if request.method == "GET" and sid is None and self.guard.admit is not None:
                try:
                    await self.guard.admit(request)
                except ApiError as err:
                    self._refuse("rate_limited", request, None)
                    return error_response(err)
            if request.method == "POST" and sid is not None:
                length = request.content_length
                too_large = (length is None and request.body_exists) or (length or 0) > self.max_http_buffer_size
                if too_large:
                    await self.close_now(sid)
                    self._refuse("payload_too_large", request, sid)
                    limit = f"At most {self.max_http_buffer_size} bytes per polling request."
                    response = error_response(
                        ApiError("payload_too_large", f"The request body is too large. {limit}", {"body": limit})
                    )
                    response.force_close()  # the unread body is not waited for
                    return response
                # engine.io reads `Content-Length` bytes with one read(), which returns what has arrived so far: a body
                # in several TCP segments was cut short. Read it whole here (REQUEST_READ_TIMEOUT bounds the wait).
                try:
                    request[PRELOADED_BODY] = await request.content.readexactly(length or 0)
                except asyncio.IncompleteReadError:
                    return error_response(ApiError("validation_error", "The request body ended early."))
            return await super().handle_request(*args, **kwargs)
        except web.HTTPException:
            raise
        except Exception as exc:
            if not upgrade:
                raise  # the app's middlewares answer for plain HTTP requests
            return failure_response(request, exc)

    def create_queue(self, *args: Any, **kwargs: Any) -> PacketQueue:
        """A session's packet queue: a list instead of asyncio.Queue's four deques (engine_socket.py)."""
        return PacketQueue()

    async def _handle_connect(self, environ: dict[str, Any], transport: str, jsonp_index: int | None = None) -> Any:
        """engine.io's handshake (python-engineio 4.15's, as is), with a LeanSocket for the session."""
        if self.start_service_task:
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(self._service_task)
        sid = self.generate_id()
        s = LeanSocket(self, sid)
        self.sockets[sid] = s
        opened = packet.Packet(
            packet.OPEN,
            {
                "sid": sid,
                "upgrades": self._upgrades(sid, transport),
                "pingTimeout": int(self.ping_timeout * 1000),
                "pingInterval": int(self.ping_interval + self.ping_interval_grace_period) * 1000,
                "maxPayload": self.max_http_buffer_size,
            },
        )
        await s.send(opened)
        del opened  # this frame lives as long as a WebSocket session: it keeps nothing it does not need
        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            self.logger.warning("Application rejected connection")
            return self._unauthorized(ret or None)
        s.schedule_ping()
        if transport == "websocket":
            ret = await s.handle_get_request(environ)
            if s.closed and sid in self.sockets:
                del self.sockets[sid]  # the WebSocket ended, and the session with it
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            cookie = self.cookie if isinstance(self.cookie, dict) else {"name": self.cookie, "path": "/", "SameSite": "Lax"}
            headers = [("Set-Cookie", self._generate_sid_cookie(sid, cookie))]
        try:
            return self._ok(await s.poll(), headers=headers, jsonp_index=jsonp_index)
        except exceptions.QueueEmpty:
            return self._bad_request()

    async def close_now(self, sid: str) -> None:
        """Close an Engine.IO session without waiting for a client to collect its last packets."""
        socket = self.sockets.get(sid)
        if socket is None:
            return
        await socket.close(wait=False, abort=False, reason=self.reason.SERVER_DISCONNECT)
        socket.queue.put_nowait(None)  # ends a waiting poll, or a WebSocket's writer (which then closes the socket)
        self.sockets.pop(sid, None)

    def _refuse(self, reason: str, request: web.Request, sid: str | None) -> None:
        self.guard.refused(reason)
        logger.warning("socket.io transport refused ({}) for {} sid={}", reason, self.guard.client_ip(request), sid)


def connection_guard(limits: RateLimits, refused: Refused = _ignore) -> TransportGuard:
    """The guard the app uses: RATE_LIMIT_CONNECTIONS_PER_MINUTE per client IP (proxy-aware), counted at the handshake."""

    def client_ip(request: web.Request) -> str:
        return limits.client_ip(request.remote, request.headers.get("X-Forwarded-For"))

    async def admit(request: web.Request) -> None:
        await limits.check_connection(client_ip(request))

    return TransportGuard(admit=admit, client_ip=client_ip, refused=refused)
