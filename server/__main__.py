"""`python -m server`: settings from the environment, the app factory, uvloop when installed."""

from __future__ import annotations

import asyncio
import gc

from aiohttp import web

from server.app import create_app
from server.settings import Settings


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    """Serve until SIGINT/SIGTERM."""
    settings = Settings.from_env()
    app = create_app(settings)
    # Everything loaded so far lives as long as the process: keep it out of the collector's scans, and collect
    # the young generation less often (each reply allocates thousands of short-lived objects).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=None,
        loop=new_event_loop(),
        # Replies get SHUTDOWN_GRACE in the app's own drain (on_shutdown); after it, handlers only have to return.
        shutdown_timeout=3,
        # An idle connection, and a request whose headers have not all arrived, are closed after this long
        # (aiohttp's keep-alive timer runs from the connection's start until a whole request head is parsed).
        keepalive_timeout=settings.http_keepalive_timeout,
    )


if __name__ == "__main__":
    main()
