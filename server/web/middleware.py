"""Cross-cutting HTTP behaviour: contract errors, request logs, CORS, WebSocket compression.

An Engine.IO WebSocket's request stays in its handler for as long as the socket lives, and so would the frame of
every middleware that awaits it (about 400 bytes each, per socket). The middlewares here that have nothing to do
for Engine.IO are plain functions that hand those requests straight to the handler, holding no frame.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from functools import partial

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from loguru import logger

from server.errors import ApiError, api_error_from
from server.storage.errors import STORAGE_DOWN, StorageError

_HTTP_CODES = {400: "validation_error", 401: "unauthorized", 404: "not_found", 405: "not_found", 413: "payload_too_large"}


def error_response(err: ApiError) -> web.Response:
    """`{"error": Error}` with the matching status (and Retry-After for 429)."""
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after is not None else None
    return web.json_response({"error": err.to_dict()}, status=err.status, headers=headers)


def is_engineio_websocket(request: web.Request) -> bool:
    """An Engine.IO WebSocket handshake: its handler answers its own failures (server/realtime/transport_guard.py)."""
    return request.path.startswith("/socket.io") and request.headers.get("Upgrade", "").lower() == "websocket"


def failure_response(request: web.Request, exc: Exception) -> web.Response:
    """The contract's answer to a failure that is not an HTTPException (call it in the `except` block: it logs)."""
    if isinstance(exc, (ApiError, StorageError, *STORAGE_DOWN)):  # ours, and storage's mapped to the contract's
        return error_response(api_error_from(exc) or ApiError("internal", "Something went wrong."))
    logger.exception("unhandled error on {} {}", request.method, request.path)
    return error_response(ApiError("internal", "Something went wrong."))


@web.middleware
def errors_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Every failure, ours or aiohttp's, answers in the contract's error shape (an Engine.IO WebSocket's, by its handler)."""
    if is_engineio_websocket(request):
        return handler(request)
    return _answer_errors(request, handler)


async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or request.path.startswith("/socket.io"):
            raise
        code = _HTTP_CODES.get(exc.status, "internal" if exc.status >= 500 else "validation_error")
        messages = {
            "not_found": "No such route.",
            "payload_too_large": "The request body is too large.",
        }
        return error_response(ApiError(code, messages.get(code, exc.reason)))
    except Exception as exc:
        return failure_response(request, exc)


@web.middleware
def access_log_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """One line per request with status and timing (the socket.io transport logs its own events).

    It sits inside errors_middleware, so a failure raised by the handler (an ApiError such as a 401 or 429, an
    aiohttp HTTPException, anything else) is logged here with the status it is about to be answered with.
    """
    if request.path.startswith("/socket.io"):
        return handler(request)
    return _logged(request, handler)


async def _logged(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except (ApiError, StorageError, *STORAGE_DOWN) as exc:
        status = mapped.status if (mapped := api_error_from(exc)) else 500
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer
        raise
    finally:
        logger.info("http {} {} -> {} in {:.1f} ms", request.method, request.path, status, (time.perf_counter() - started) * 1000)


def cors_middleware(allowed: tuple[str, ...]) -> Middleware:
    """REST CORS for the configured origins; with none configured, only the server's own origin is served."""

    @web.middleware
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if request.path.startswith("/socket.io"):  # engine.io answers its own CORS
            return handler(request)
        return with_cors(request, handler)

    async def with_cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allow = origin is not None and ("*" in allowed or origin in allowed)
        if allow and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if allow and origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        return response

    return middleware


@web.middleware
async def no_ws_compression_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse permessage-deflate by not passing the offer on: it costs ~95 KB per socket for small messages.

    For a server whose WebSocketResponse cannot be configured (the bench's echo baseline); the app's own refuses it
    where it is made (server/realtime/engine_socket.py), without copying the request.
    """
    if request.path.startswith("/socket.io") and "Sec-WebSocket-Extensions" in request.headers:
        headers = request.headers.copy()
        del headers["Sec-WebSocket-Extensions"]
        request = request.clone(headers=headers)
    return await handler(request)


def websocket_registry_middleware(open_websockets: set[asyncio.BaseTransport]) -> Middleware:
    """Remember the connection under every WebSocket, so shutdown can close them all at once.

    An Engine.IO CLOSE packet alone leaves the connection to the client, and browsers wait for the TCP side to
    close; shutdown closes it instead, which clients answer by reconnecting. The connection is forgotten when its
    task ends (a WebSocket is the last request of its connection), so no frame waits here while the socket lives.
    """

    @web.middleware
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        transport = request.transport
        if (
            transport is not None
            and transport not in open_websockets
            and request.headers.get("Upgrade", "").lower() == "websocket"
        ):
            open_websockets.add(transport)
            request.task.add_done_callback(partial(_forget, open_websockets, transport))
        return handler(request)

    return middleware


def _forget(open_websockets: set[asyncio.BaseTransport], transport: asyncio.BaseTransport, _: object) -> None:
    open_websockets.discard(transport)


def body_read_timeout_middleware(
    timeout: float,
) -> Middleware:
    """A request body must arrive within `timeout` seconds, or the client gets 408 and the connection is closed.

    The deadline watches the body stream rather than reading it here, so every handler (engine.io's included)
    keeps reading the way it does; when the deadline passes with the body incomplete, the pending read fails.
    """

    @web.middleware
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if timeout <= 0 or not request.body_exists or request.headers.get("Upgrade", "").lower() == "websocket":
            return handler(request)
        return with_deadline(request, handler)

    async def with_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        expired: list[bool] = []

        def expire() -> None:
            if not request.content.is_eof():
                expired.append(True)
                request.content.set_exception(web.RequestPayloadError("The request body did not arrive in time."))

        deadline = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            response = await handler(request)
        except Exception:
            if not expired:
                raise
            response = web.Response()  # replaced below
        finally:
            deadline.cancel()
        if not expired:
            return response
        logger.warning(
            "http {} {} from {}: body not received within {:g} s", request.method, request.path, request.remote, timeout
        )
        slow = web.json_response(
            {"error": {"code": "validation_error", "message": f"The request body did not arrive within {timeout:g} s."}},
            status=408,
        )
        slow.force_close()
        await slow.prepare(request)
        await slow.write_eof()
        if request.protocol is not None:
            request.protocol.force_close()  # the rest of the body is not waited for (no lingering read)
        return slow

    return middleware
