"""The lean Engine.IO session (server/realtime/engine_socket.py) against real clients over real sockets.

Pings and the pong deadline, a session closed by the server taking its WebSocket with it, the polling-to-WebSocket
upgrade, WebSocket compression as configured, the shutdown registry, and handshake failures in the contract's shape.
The app here is the server's transport alone (no Redis): ChatSocketServer behind the app's WebSocket middlewares.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis
import socketio
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.realtime.server import ChatSocketServer
from server.realtime.transport_guard import TransportGuard
from server.web.middleware import (
    access_log_middleware,
    body_read_timeout_middleware,
    errors_middleware,
    websocket_registry_middleware,
)
from tests.servers import free_port

ENGINE_WS = "/socket.io/?EIO=4&transport=websocket"


class Transport:
    """A running ChatSocketServer and what the test looks at: disconnect reasons and the WebSocket registry."""

    def __init__(self, server: TestServer, sio: ChatSocketServer, open_websockets: set[asyncio.BaseTransport]) -> None:
        self.server = server
        self.sio = sio
        self.open_websockets = open_websockets
        self.disconnects: list[str] = []
        self.connected: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def transport(**options: Any) -> AsyncIterator[Transport]:
    """The server's Socket.IO transport on a port of its own; `options` go to ChatSocketServer."""
    open_websockets: set[asyncio.BaseTransport] = set()
    app = web.Application(
        middlewares=[
            websocket_registry_middleware(open_websockets),
            errors_middleware,
            access_log_middleware,
            body_read_timeout_middleware(5),
        ]
    )
    sio = ChatSocketServer(async_mode="aiohttp", logger=False, engineio_logger=False, **options)
    sio.attach(app)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    running = Transport(server, sio, open_websockets)

    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        running.connected.append(sid)

    async def disconnect(sid: str, reason: Any = None) -> None:
        running.disconnects.append(str(reason))

    async def echo(sid: str, data: Any) -> Any:
        return data

    sio.on("connect", connect)
    sio.on("disconnect", disconnect)
    sio.on("echo", echo)
    await server.start_server()
    try:
        yield running
    finally:
        await server.close()


async def joined_websocket(http: aiohttp.ClientSession, url: str, **options: Any) -> aiohttp.ClientWebSocketResponse:
    """A bare Engine.IO WebSocket that joined the default namespace (pings are left to the caller)."""
    ws = await http.ws_connect(url + ENGINE_WS, **options)
    opened = await ws.receive(timeout=5)
    assert opened.type == aiohttp.WSMsgType.TEXT and opened.data.startswith("0"), opened
    await ws.send_str("40")
    joined = await ws.receive(timeout=5)
    assert joined.type == aiohttp.WSMsgType.TEXT and joined.data.startswith("40"), joined
    return ws


async def settled(condition: Callable[[], bool], seconds: float = 3) -> bool:
    """Whether `condition` holds within `seconds` (the server finishes a session after its client saw it end)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def texts_until_closed(ws: aiohttp.ClientWebSocketResponse, seconds: float, answer_pings: bool) -> tuple[list[str], bool]:
    """The text frames received within `seconds`, and whether the server closed the WebSocket meanwhile."""
    texts: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                message = await ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    return texts, True
                texts.append(message.data)
                if answer_pings and message.data == "2":
                    await ws.send_str("3")
    return texts, False


async def test_a_client_answering_pings_stays_and_a_silent_one_is_closed_after_the_pong_deadline() -> None:
    async with transport(ping_interval=0.2, ping_timeout=0.3) as running, aiohttp.ClientSession() as http:
        lively = await joined_websocket(http, running.url)
        silent = await joined_websocket(http, running.url)
        (lively_texts, lively_closed), (silent_texts, silent_closed) = await asyncio.gather(
            texts_until_closed(lively, 1.5, answer_pings=True), texts_until_closed(silent, 1.5, answer_pings=False)
        )
        assert not lively_closed and lively_texts.count("2") >= 3, lively_texts
        # one ping, no pong within ping_timeout: the session ends and its WebSocket is closed by the server
        assert silent_closed and silent_texts[0] == "2" and silent_texts.count("2") == 1, silent_texts
        assert await settled(lambda: len(running.sio.eio.sockets) == 1 and len(running.open_websockets) == 1)
        assert running.disconnects == ["ping timeout"]
        await lively.close()


async def test_a_session_closed_by_the_server_takes_its_websocket_with_it() -> None:
    """engine.io left the WebSocket to the client (or to a read timeout 45 s later); it is closed after the CLOSE packet."""
    async with transport() as running, aiohttp.ClientSession() as http:
        ws = await joined_websocket(http, running.url)
        (eio_sid,) = running.sio.eio.sockets
        await running.sio.eio.disconnect(eio_sid)
        texts, closed = await texts_until_closed(ws, 3, answer_pings=False)
        assert closed and texts[-1] == "1", texts  # the CLOSE packet, then the WebSocket's close
        assert await settled(lambda: not running.sio.eio.sockets and not running.open_websockets)
        assert running.disconnects == ["server disconnect"]


async def test_a_client_that_leaves_is_forgotten_and_its_connection_leaves_the_shutdown_registry() -> None:
    async with transport() as running, aiohttp.ClientSession() as http:
        ws = await joined_websocket(http, running.url)
        assert len(running.open_websockets) == 1
        assert await ws.send_str('42["echo","x"]') is None
        await ws.close()
        assert await settled(lambda: not running.open_websockets and not running.sio.eio.sockets)
        assert running.disconnects == ["transport close"]


async def test_a_malformed_frame_ends_the_session_cleanly() -> None:
    async with transport() as running, aiohttp.ClientSession() as http:
        ws = await joined_websocket(http, running.url)
        await ws.send_str("x-not-a-packet")
        _, closed = await texts_until_closed(ws, 3, answer_pings=False)
        assert closed
        assert await settled(lambda: not running.sio.eio.sockets)
        assert running.disconnects == ["transport close"]


async def test_long_polling_upgrades_to_a_websocket_and_events_flow() -> None:
    async with transport() as running:
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(running.url, transports=["polling", "websocket"], wait_timeout=5)
        try:
            for _ in range(50):
                if client.transport() == "websocket":
                    break
                await asyncio.sleep(0.05)
            assert client.transport() == "websocket"
            assert await client.call("echo", {"n": 1}, timeout=5) == {"n": 1}
            assert len(running.open_websockets) == 1
        finally:
            await client.disconnect()


@pytest.mark.parametrize("enabled", [False, True])
async def test_websocket_compression_is_negotiated_only_when_enabled(enabled: bool) -> None:
    async with transport(ws_compression=enabled) as running, aiohttp.ClientSession() as http:
        ws = await joined_websocket(http, running.url, compress=15)
        assert ws.compress == (15 if enabled else 0)
        await ws.send_str('421["echo","hello"]')
        texts, _ = await texts_until_closed(ws, 0.5, answer_pings=True)
        assert texts == ['431["hello"]']
        await ws.close()


async def test_a_websocket_handshake_that_fails_is_answered_in_the_contract_shape() -> None:
    """The error middleware lets Engine.IO WebSockets through; the transport answers their failures the same way."""

    async def storage_down(request: web.Request) -> None:
        raise redis.ConnectionError("Redis is down")

    async with transport() as running, aiohttp.ClientSession() as http:
        running.sio.eio.guard = TransportGuard(admit=storage_down)
        polling = await http.get(running.url + "/socket.io/?EIO=4&transport=polling")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(running.url + ENGINE_WS)
        assert refused.value.status == polling.status >= 500
        upgrade = await http.get(
            running.url + ENGINE_WS,
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert upgrade.status == polling.status
        assert await upgrade.json() == await polling.json()
        assert not running.sio.eio.sockets
