"""Hostile use of the Engine.IO/Socket.IO transport and of HTTP reading, against real listening servers.

Binary attachment packets, oversized long-polling POSTs, bare engine.io connections, repeated namespace CONNECTs,
slow request bodies and headers, and Redis writes driven by anonymous health checks (issue 11).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from server.app_keys import SIO
from tests.clients import Http, RawSocket, open_http, request
from tests.processes import ServerProcess, rss_mb
from tests.servers import RunningServer, ServerFactory

pytestmark = [
    pytest.mark.slow,  # floods, slow clients and server processes
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

ATTACHMENT_HEADER = '45999999999-["send-message",{"_placeholder":true,"num":0}]'
FRAME = b"\x00" * 60_000


async def closed_within(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> bool:
    """Whether the server closes this Engine.IO WebSocket (CLOSE packet or the socket itself) within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await ws.receive()
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    return True
                if message.type == aiohttp.WSMsgType.ERROR:
                    return True
                if message.type == aiohttp.WSMsgType.TEXT and message.data == "1":
                    return True
                if message.type == aiohttp.WSMsgType.TEXT and message.data == "2":
                    await ws.send_str("3")
    except TimeoutError:
        return False


async def polling_handshake(http: Http, url: str) -> tuple[int, str | None]:
    """An Engine.IO long-polling handshake: (status, sid or None)."""
    status, text = await http.get_text(f"{url}/socket.io/?EIO=4&transport=polling")
    if status != 200:
        return status, None
    return 200, orjson.loads(text[1:])["sid"]


async def bare_websocket(http: Http, url: str) -> aiohttp.ClientWebSocketResponse:
    """An Engine.IO WebSocket that got its OPEN packet and never joins a namespace."""
    ws = await http.session.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket")
    opened = await ws.receive(timeout=5)
    assert opened.type == aiohttp.WSMsgType.TEXT and opened.data.startswith("0"), opened
    return ws


async def health(url: str) -> dict[str, Any]:
    return (await request("GET", f"{url}/health")).body


async def wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def open_server(start_server: ServerFactory, **overrides: Any) -> RunningServer:
    return await start_server(rate_limit_sessions_per_minute=0, rate_limit_messages_per_minute=0, **overrides)


async def launch(processes: list[ServerProcess], redis_url: str, **env: str) -> ServerProcess:
    """`python run.py` against the test Redis, local provider only."""
    process = ServerProcess({"REDIS_URL": redis_url, "AI_PROVIDERS": "local", **env})
    processes.append(process)
    return await process.start()


# 1. Binary attachments -------------------------------------------------------------------------------------------


async def test_attachment_packet_closes_the_socket_before_anything_is_buffered(start_server: ServerFactory) -> None:
    server = await open_server(start_server)
    sio = server.app[SIO]
    raw = await RawSocket.open(server.url)
    try:
        await raw.send_text(ATTACHMENT_HEADER)
        with contextlib.suppress(Exception):
            for _ in range(5):
                await raw.ws.send_bytes(FRAME)
        assert await closed_within(raw.ws, 5), "the socket that announced attachments stayed open"
        assert sio._binary_packet == {}  # nothing waits for attachments
        assert await wait_until(lambda: asyncio.sleep(0, not sio.eio.sockets), 5)
    finally:
        await raw.close()


async def test_binary_frame_alone_closes_the_socket(start_server: ServerFactory) -> None:
    server = await open_server(start_server)
    raw = await RawSocket.open(server.url)
    try:
        await raw.ws.send_bytes(b"\x01\x02\x03")
        assert await closed_within(raw.ws, 5)
    finally:
        await raw.close()


async def test_refused_binary_event_drops_only_the_attachments_it_announced(start_server: ServerFactory) -> None:
    server = await open_server(start_server)
    raw = await RawSocket.open(server.url)
    try:
        await raw.send_text('451-7["send-message",{"_placeholder":true,"num":0}]')
        await raw.ws.send_bytes(b"\x00" * 100)
        ack = await raw.ack(7)
        assert ack["ok"] is False and ack["error"]["code"] == "validation_error"
        assert (await raw.call_raw("join-chat", '{"userId": "still-here"}'))["ok"]  # the socket still works
        assert server.app[SIO]._binary_packet == {}
        await raw.ws.send_bytes(b"\x00" * 100)  # one frame more than announced
        assert await closed_within(raw.ws, 5)
    finally:
        await raw.close()


async def test_attachment_flood_leaves_server_memory_bounded(processes: list[ServerProcess], redis_url: str) -> None:
    """20 sockets each announce 999,999,999 attachments and send 3 MB of frames: RSS grows < 25 MB (was +60 MB)."""
    server = await launch(processes, redis_url)
    assert server.process is not None
    await health(server.url)
    before = rss_mb(server.process.pid)
    sockets = [await RawSocket.open(server.url) for _ in range(20)]
    try:

        async def flood(raw: RawSocket) -> bool:
            await raw.send_text(ATTACHMENT_HEADER)
            with contextlib.suppress(Exception):
                for _ in range(50):
                    await raw.ws.send_bytes(FRAME)
            return await closed_within(raw.ws, 10)

        closed = await asyncio.gather(*(flood(raw) for raw in sockets))
        await asyncio.sleep(0.5)
        grown = rss_mb(server.process.pid) - before
        assert grown < 25, f"server RSS grew {grown:.0f} MB"
        assert all(closed), f"{closed.count(False)} sockets stayed open"
    finally:
        for raw in sockets:
            await raw.close()


# 5. Oversized long-polling POSTs ---------------------------------------------------------------------------------


async def test_oversized_polling_post_is_answered_413_and_frees_the_session(start_server: ServerFactory, http: Http) -> None:
    server = await open_server(start_server, socket_max_packet_bytes=20_000)
    sio = server.app[SIO]
    limit = sio.eio.max_http_buffer_size
    status, sid = await polling_handshake(http, server.url)
    assert status == 200 and sid in sio.eio.sockets
    url = f"{server.url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    async with asyncio.timeout(5):
        response = await http.post(url, data=b"4" + b"x" * (limit + 1000))
    assert response.status == 413
    body = response.body
    assert body["error"]["code"] == "payload_too_large"
    assert sid not in sio.eio.sockets
    response = await http.get(url)
    assert response.status == 400  # the session is gone
    # a POST within the limit still works on a fresh session
    status, sid = await polling_handshake(http, server.url)
    response = await http.post(f"{server.url}/socket.io/?EIO=4&transport=polling&sid={sid}", data=b"40")
    assert response.status == 200


async def test_oversized_polling_posts_do_not_hang_or_leak(processes: list[ServerProcess], redis_url: str) -> None:
    """400 oversized polling POSTs: every one answered 413 within 5 s; RSS grows < 20 MB (was ~83 KB per POST)."""
    server = await launch(processes, redis_url, SOCKET_MAX_PACKET_BYTES="20000", RATE_LIMIT_CONNECTIONS_PER_MINUTE="0")
    assert server.process is not None
    before = rss_mb(server.process.pid)
    body = b"4" + b"x" * 100_000
    async with open_http(connector=aiohttp.TCPConnector(limit=50)) as http:

        async def one() -> int:
            _, sid = await polling_handshake(http, server.url)
            url = f"{server.url}/socket.io/?EIO=4&transport=polling&sid={sid}"
            async with asyncio.timeout(5):
                return (await http.post(url, data=body)).status

        statuses = await asyncio.gather(*(one() for _ in range(400)))
    assert set(statuses) == {413}
    assert (await health(server.url))["engineConnections"] == 0
    grown = rss_mb(server.process.pid) - before
    assert grown < 20, f"server RSS grew {grown:.0f} MB"


# 6. Bare engine.io connections -----------------------------------------------------------------------------------


async def test_engineio_handshakes_count_against_the_connection_limit(start_server: ServerFactory, http: Http) -> None:
    server = await open_server(start_server, rate_limit_connections_per_minute=3)
    for _ in range(3):
        assert (await polling_handshake(http, server.url))[0] == 200
    response = await http.get(f"{server.url}/socket.io/?EIO=4&transport=polling")
    assert response.status == 429
    assert response.body["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.session.ws_connect(f"{server.url}/socket.io/?EIO=4&transport=websocket")
    assert len(server.app[SIO].eio.sockets) == 3


async def test_transport_that_joins_no_namespace_is_closed(start_server: ServerFactory, http: Http) -> None:
    server = await open_server(start_server, socket_connect_timeout=0.5)
    idle = await bare_websocket(http, server.url)
    joined = await RawSocket.open(server.url)
    try:
        assert await closed_within(idle, 5), "a transport without a namespace stayed open"
        assert not await closed_within(joined.ws, 1.0)  # one that joined in time stays
        report = await health(server.url)
        assert report["engineConnections"] == 1 and report["connectedClients"] == 1
    finally:
        await joined.close()


async def test_repeated_namespace_connects_close_the_transport(start_server: ServerFactory, http: Http) -> None:
    server = await open_server(start_server)
    raw = await RawSocket.open(server.url)
    try:
        await raw.send_text("40")
        assert await closed_within(raw.ws, 5), "a second CONNECT to the same namespace was tolerated"
    finally:
        await raw.close()
    # refused CONNECTs (a bad agent key) may not be retried forever
    ws = await bare_websocket(http, server.url)
    for _ in range(6):
        await ws.send_str('40/agents,{"key":"wrong-key-guess"}')
    assert await closed_within(ws, 5)
    await ws.close()


async def test_health_and_metrics_report_engineio_connections(start_server: ServerFactory, http: Http) -> None:
    server = await open_server(start_server)
    sockets = [await bare_websocket(http, server.url) for _ in range(3)]
    report = await health(server.url)
    assert report["engineConnections"] == 3 and report["connectedClients"] == 0
    _, text = await http.get_text(f"{server.url}/metrics")
    assert "support_engineio_connections 3.0" in text
    for ws in sockets:
        await ws.close()


async def test_bare_connection_flood_is_limited_and_reaped(processes: list[ServerProcess], redis_url: str) -> None:
    """1,500 polling handshakes from one IP: 200 admitted (the limit), the rest 429; all reaped; RSS < 30 MB up."""
    server = await launch(processes, redis_url, RATE_LIMIT_CONNECTIONS_PER_MINUTE="200", SOCKET_CONNECT_TIMEOUT="1")
    assert server.process is not None
    before = rss_mb(server.process.pid)
    async with open_http(connector=aiohttp.TCPConnector(limit=50)) as http:
        statuses = await asyncio.gather(*(polling_handshake(http, server.url) for _ in range(1500)))
    codes = [status for status, _ in statuses]
    assert codes.count(200) == 200 and codes.count(429) == 1300
    assert await wait_until(lambda: _engine_connections_are(server.url, 0), 8)
    grown = rss_mb(server.process.pid) - before
    assert grown < 30, f"server RSS grew {grown:.0f} MB"


async def _engine_connections_are(url: str, expected: int) -> bool:
    return (await health(url))["engineConnections"] == expected


# 11. Slow request bodies and headers -----------------------------------------------------------------------------


async def trickle(host: str, port: int, head: bytes, seconds: float) -> bytes:
    """Send `head`, then one byte of body every 0.2 s; what the server answered before closing (b"" if it never did)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head)
    answer = b""
    try:
        async with asyncio.timeout(seconds):
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        chunk = await reader.read(65536)
                        if not chunk:
                            return answer
                        answer += chunk
                        continue
                writer.write(b"x")
                await writer.drain()
    except ConnectionError:
        return answer  # closed by the server while we were still sending
    except TimeoutError:
        return answer + b"<still open>"
    finally:
        writer.close()


async def test_slow_request_bodies_time_out(start_server: ServerFactory, http: Http) -> None:
    server = await open_server(start_server, request_read_timeout=1.0)
    host, port = server.server.host, server.server.port
    assert port is not None
    rest_head = (
        b"POST /api/v1/chat/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{"
    )
    _, sid = await polling_handshake(http, server.url)
    socket_head = (
        f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: text/plain\r\nContent-Length: 15000\r\n\r\n4"
    ).encode()
    answers = await asyncio.gather(*(trickle(host, port, rest_head, 6) for _ in range(50)), trickle(host, port, socket_head, 6))
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"<still open>" not in answer


async def test_slow_request_headers_time_out_when_serving_directly(processes: list[ServerProcess], redis_url: str) -> None:
    server = await launch(processes, redis_url, HTTP_KEEPALIVE_TIMEOUT="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed = False
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(6):
                for _ in range(30):
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            if not await reader.read(1024):
                                closed = True
                                break
        assert closed or reader.at_eof(), "a request whose headers never finish kept its connection"
    finally:
        writer.close()


# Low: health without Redis writes --------------------------------------------------------------------------------


async def test_anonymous_health_checks_do_not_write_to_redis(start_server: ServerFactory, redis_url: str) -> None:
    server = await open_server(start_server)
    client = redis.Redis.from_url(redis_url)
    try:

        def prunes() -> int:
            stats = client.info("commandstats")
            return int(stats.get("cmdstat_zremrangebyscore", {}).get("calls", 0))

        await health(server.url)
        before = prunes()
        for _ in range(20):
            report = await health(server.url)
            assert report["redis"]["status"] == "ok"
        assert prunes() - before == 0
    finally:
        client.close()
