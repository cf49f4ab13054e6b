"""WORKERS above 1: every request of an Engine.IO session reaches the worker that holds the session.

SO_REUSEPORT spreads connections over the workers by their addresses and ports, so the requests of one long-polling
session (a GET waiting for packets, a POST beside it on another connection, the WebSocket upgrade) land on any
worker, while the session lives in one. Without help, polling clients would get `Invalid session` from the others.
Each worker therefore names itself in the session ids it hands out (`w2.<engine.io id>`) and also listens on a
private unix socket; a request for another worker's session is forwarded there (an HTTP request as it came, a
WebSocket upgrade as a two-way relay). A WebSocket opened without a session id (how the pages connect) is served
where it lands and never forwarded. One worker process alone (WORKERS=1) installs none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from loguru import logger
from multidict import CIMultiDict

from server.realtime.transport_guard import GuardedEngineIO

ENGINEIO_PATH = "/socket.io/"
PEER_HEADER = "X-Worker-Peer"  # the client's address, from the worker that forwarded; trusted on the private socket only
# Per-connection headers, and the WebSocket handshake's own (the relay makes a handshake of its own upstream).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Accept",
        PEER_HEADER,
    )
)


def sid_prefix(index: int) -> str:
    """The prefix of the session ids worker `index` hands out."""
    return f"w{index}."


def owner_of(sid: str | None) -> int | None:
    """The worker named in a session id, None for an id without one."""
    if not sid or sid[0] != "w":
        return None
    head, dot, _ = sid.partition(".")
    number = head[1:]
    return int(number) if dot and number.isdigit() and len(number) < 6 else None


def socket_path(directory: Path, index: int) -> Path:
    """Where worker `index` listens for requests other workers forward to it."""
    return directory / f"w{index}.sock"


def _on_unix_socket(request: web.Request) -> bool:
    """Whether the request came over a unix socket (the private one: the public listener is TCP)."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def _forwarded_headers(request: web.Request) -> CIMultiDict[str]:
    headers = CIMultiDict((name, value) for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP)
    headers[PEER_HEADER] = request.remote or ""
    return headers


def _invalid_session(sid: str) -> web.Response:
    """What engine.io answers for a session it does not know: the client then starts a new one."""
    return web.Response(status=400, text=f'"Invalid session {sid}"', content_type="text/plain")


class SessionAffinity:
    """The forwarding of one worker: its index, where the workers' private sockets are, one client per peer worker."""

    def __init__(self, index: int, directory: Path, max_message_bytes: int) -> None:
        self.index = index
        self.directory = directory
        self.max_message_bytes = max_message_bytes
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    @property
    def own_socket(self) -> Path:
        """This worker's private socket."""
        return socket_path(self.directory, self.index)

    def install(self, app: web.Application, engineio: GuardedEngineIO) -> None:
        """Name this worker in new session ids, forward requests for other workers' sessions, close clients at the end."""
        engineio.sid_prefix = sid_prefix(self.index)
        app.middlewares.append(self.middleware)
        app.on_cleanup.append(self._close)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Engine.IO requests only: a forwarded one gets its client's address back; another worker's is forwarded."""
        if not request.path.startswith(ENGINEIO_PATH):
            return await handler(request)
        if _on_unix_socket(request):
            # Arrived on the private unix socket, from another worker: the client's address is the one it saw.
            return await handler(request.clone(remote=request.headers.get(PEER_HEADER, "")))
        sid = request.query.get("sid")
        owner = owner_of(sid)
        if owner is None or owner == self.index or sid is None:
            return await handler(request)
        if request.method == "POST" and (request.content_length is None or request.content_length > self.max_message_bytes):
            return await handler(request)  # refused here as the owner would (413): nothing to forward
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._relay_websocket(request, owner, sid)
        return await self._forward(request, owner, sid)

    def _session(self, owner: int) -> aiohttp.ClientSession:
        session = self._sessions.get(owner)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                # No cap on connections: each waiting long poll holds one, and a POST must never queue behind them.
                connector=aiohttp.UnixConnector(path=str(socket_path(self.directory, owner)), limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),  # a long poll waits for packets
                auto_decompress=False,  # bodies pass through as the owner encoded them
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
            self._sessions[owner] = session
        return session

    async def _forward(self, request: web.Request, owner: int, sid: str) -> web.StreamResponse:
        """One HTTP request to the owner's socket, and its answer back as it came."""
        body = await request.content.readexactly(request.content_length or 0) if request.method == "POST" else None
        try:
            async with self._session(owner).request(
                request.method, f"http://worker{request.path_qs}", headers=_forwarded_headers(request), data=body
            ) as upstream:
                payload = await upstream.read()
                headers = CIMultiDict((name, value) for name, value in upstream.headers.items() if name.lower() not in HOP_BY_HOP)
                return web.Response(status=upstream.status, headers=headers, body=payload)
        except (aiohttp.ClientError, OSError) as err:
            logger.debug("engine.io session {} of worker {} unreachable: {}", sid, owner, type(err).__name__)
            return _invalid_session(sid)

    async def _relay_websocket(self, request: web.Request, owner: int, sid: str) -> web.StreamResponse:
        """The WebSocket upgrade of another worker's polling session: a WebSocket to the owner, frames relayed both ways."""
        try:
            upstream = await self._session(owner).ws_connect(
                f"http://worker{request.path_qs}",
                headers=_forwarded_headers(request),
                max_msg_size=self.max_message_bytes,
                compress=0,
            )
        except (aiohttp.ClientError, OSError) as err:
            logger.debug("engine.io upgrade of {} to worker {} refused: {}", sid, owner, type(err).__name__)
            return _invalid_session(sid)
        downstream = web.WebSocketResponse(max_msg_size=self.max_message_bytes, compress=False)
        try:
            await downstream.prepare(request)
            pumps = [
                asyncio.create_task(_pump(downstream, upstream)),
                asyncio.create_task(_pump(upstream, downstream)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            await upstream.close()
            await downstream.close()
        return downstream

    async def _close(self, _: web.Application) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse
) -> None:
    """Every text and binary frame from `source` to `sink`, until either closes."""
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
