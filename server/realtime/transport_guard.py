"""Engine.IO's HTTP edge, guarded: the connection limit at the handshake and oversized polling POSTs refused at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import engineio
from aiohttp import web
from loguru import logger

from server.errors import ApiError
from server.web.middleware import error_response
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
    GET to drain the session's queue, so the POST hung and kept its buffers.
    """

    _async: dict[str, Any]  # engine.io's hooks of its async driver (set by its __init__, untyped)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = TransportGuard()
        self._translate_original = self._async["translate_request"]
        self._async = {**self._async, "translate_request": self._translate}  # a copy: the driver's dict is shared

    def _translate(self, request: web.Request) -> dict[str, Any]:
        """engine.io's environ, reading the POST body we already read in full (see handle_request)."""
        environ: dict[str, Any] = self._translate_original(request)
        body = request.get(PRELOADED_BODY)
        if body is not None:
            environ["wsgi.input"] = _Preloaded(body)
        return environ

    async def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse what must not reach engine.io, then let engine.io handle the rest."""
        request = args[0] if args else None
        if not isinstance(request, web.Request):
            return await super().handle_request(*args, **kwargs)
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
