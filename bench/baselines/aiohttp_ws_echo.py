"""Baseline: a raw aiohttp WebSocket echo server (no Socket.IO, no Redis, no chat logic): the floor of the web stack.

Echoes every text frame on /ws. permessage-deflate is refused unless --compress, like this server's default
(WS_COMPRESSION=false). It cannot speak Socket.IO, so bench/drivers/ws_echo.mjs and idle_join.mjs --protocol ws drive it.

Usage: python bench/baselines/aiohttp_ws_echo.py --port 3305 [--compress]
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import WSMsgType, web


def build(compress: bool) -> web.Application:
    """The echo app: /ws echoes text frames, /api/v1/health answers for the harness."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=compress)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/api/v1/health", health)
    return app


def main() -> None:
    """Serve on loopback until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3305)
    parser.add_argument("--compress", action="store_true")
    args = parser.parse_args()
    web.run_app(build(args.compress), host="127.0.0.1", port=args.port, print=None, access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
