"""Baseline: a bare python-socketio server that speaks the load driver's subset and echoes (optionally one Redis pipeline
per message). It shows what the stack costs before any chat logic.

WebSocket compression is refused the way this server refuses it (the issue compares memory "without compression");
`--ws-compression` accepts it, as python-engineio's aiohttp driver does by default.

Usage: python -m bench.baselines.socketio_echo --port 3201 [--redis redis://127.0.0.1:6390/0] [--ws-compression]
"""

from __future__ import annotations

import argparse
import time
import uuid

import redis.asyncio as aioredis
import socketio
import uvloop
from aiohttp import web

from server.web.middleware import no_ws_compression_middleware


def build(redis_url: str | None, ws_compression: bool = False) -> web.Application:
    """The echo app; with a Redis URL each message also costs one pipelined write, like a stored chat turn."""
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*")
    app = web.Application(middlewares=[] if ws_compression else [no_ws_compression_middleware])
    sio.attach(app)
    store = aioredis.Redis.from_url(redis_url) if redis_url else None

    @sio.on("join-chat")
    async def join(sid: str, payload: dict) -> dict:
        session_id = str(uuid.uuid4())
        await sio.enter_room(sid, session_id)
        return {"ok": True, "sessionId": session_id, "token": uuid.uuid4().hex}

    @sio.on("send-message")
    async def send(sid: str, payload: dict) -> dict:
        message_id = str(uuid.uuid4())
        if store is not None:
            async with store.pipeline(transaction=False) as pipe:
                pipe.rpush(f"echo:{payload['sessionId']}", payload["message"])
                pipe.expire(f"echo:{payload['sessionId']}", 600)
                await pipe.execute()
        reply = {"id": str(uuid.uuid4()), "role": "assistant", "content": payload["message"], "createdAt": time.time()}
        await sio.emit("message-received", {"sessionId": payload["sessionId"], "message": reply}, room=payload["sessionId"])
        return {"ok": True, "messageId": message_id}

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/api/v1/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3201)
    parser.add_argument("--redis", default=None)
    parser.add_argument("--ws-compression", action="store_true")
    args = parser.parse_args()
    app = build(args.redis, args.ws_compression)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
