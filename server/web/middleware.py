"""Cross-cutting HTTP behaviour: contract errors, request logs, CORS, WebSocket compression."""

from __future__ import annotations

import asyncio
import time

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


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure, ours or aiohttp's, answers in the contract's error shape."""
    try:
        return await handler(request)
    except (ApiError, StorageError, *STORAGE_DOWN) as exc:  # ours, and storage's mapped to the contract's
        return error_response(api_error_from(exc) or ApiError("internal", "Something went wrong."))
    except web.HTTPException as exc:
        if exc.status < 400 or request.path.startswith("/socket.io"):
            raise
        code = _HTTP_CODES.get(exc.status, "internal" if exc.status >= 500 else "validation_error")
        messages = {
            "not_found": "No such route.",
            "payload_too_large": "The request body is too large.",
        }
        return error_response(ApiError(code, messages.get(code, exc.reason)))
    except Exception:
        logger.exception("unhandled error on {} {}", request.method, request.path)
        return error_response(ApiError("internal", "Something went wrong."))


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request with status and timing (the socket.io transport logs its own events).

    It sits inside errors_middleware, so a failure raised by the handler (an ApiError such as a 401 or 429, an
    aiohttp HTTPException, anything else) is logged here with the status it is about to be answered with.
    """
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
        if not request.path.startswith("/socket.io"):
            logger.info(
                "http {} {} -> {} in {:.1f} ms",
                request.method,
                request.path,
                status,
                (time.perf_counter() - started) * 1000,
            )


def cors_middleware(allowed: tuple[str, ...]) -> Middleware:
    """REST CORS for the configured origins; with none configured, only the server's own origin is served."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allow = origin is not None and ("*" in allowed or origin in allowed) and not request.path.startswith("/socket.io")
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
    """Refuse permessage-deflate by not passing the offer on: it costs ~95 KB per socket for small messages."""
    if request.path.startswith("/socket.io") and "Sec-WebSocket-Extensions" in request.headers:
        headers = request.headers.copy()
        del headers["Sec-WebSocket-Extensions"]
        request = request.clone(headers=headers)
    return await handler(request)


def websocket_registry_middleware(
    open_websockets: set[asyncio.BaseTransport],
) -> Middleware:
    """Remember the connection under every WebSocket, so shutdown can close them all at once.

    An Engine.IO CLOSE packet alone leaves the connection to the client, and browsers wait for the TCP side to
    close; shutdown closes it instead, which clients answer by reconnecting.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is None or request.headers.get("Upgrade", "").lower() != "websocket":
            return await handler(request)
        open_websockets.add(transport)
        try:
            return await handler(request)
        finally:
            open_websockets.discard(transport)

    return middleware


def body_read_timeout_middleware(
    timeout: float,
) -> Middleware:
    """A request body must arrive within `timeout` seconds, or the client gets 408 and the connection is closed.

    The deadline watches the body stream rather than reading it here, so every handler (engine.io's included)
    keeps reading the way it does; when the deadline passes with the body incomplete, the pending read fails.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if timeout <= 0 or not request.body_exists or request.headers.get("Upgrade", "").lower() == "websocket":
            return await handler(request)
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
