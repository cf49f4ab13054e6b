"""`python -m server`: settings from the environment, the app factory, uvloop when installed.

With WORKERS above 1 this process becomes the supervisor of that many workers (server/supervisor.py), each of
them this same entry point started with `--worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from server.app import create_app
from server.app_keys import SIO
from server.realtime.affinity import SessionAffinity
from server.settings import Settings


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options a supervisor gives its workers; a server started by hand takes none."""
    parser = argparse.ArgumentParser(
        prog="run.py", description="The support chat server: every setting comes from the environment (docs/configuration.md)."
    )
    parser.add_argument("--worker", type=int, metavar="INDEX", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--embedded-redis", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--route-dir", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_settings(settings: Settings, embedded_redis: str | None) -> Settings:
    """A worker's settings: one process of its own, on its supervisor's embedded Redis when there is no REDIS_URL."""
    if embedded_redis is None:
        return dataclasses.replace(settings, workers=1)
    return dataclasses.replace(settings, workers=1, redis_url=embedded_redis, redis_embedded_shared=True)


def ready_notifier(fd: int) -> Callable[..., None]:
    """For run_app's `print`, called once its sites listen: tell the supervisor on `fd`, then close it."""

    def notify(*_: object) -> None:
        try:
            os.write(fd, b"listening\n")
        finally:
            os.close(fd)

    return notify


def serve(
    settings: Settings,
    *,
    worker: int | None = None,
    route_dir: Path | None = None,
    on_listening: Callable[..., None] | None = None,
) -> None:
    """Build the app and serve it until SIGINT/SIGTERM (as worker `worker` of a supervisor, when given)."""
    app = create_app(settings)
    private_socket: str | None = None
    if worker is not None and route_dir is not None:
        engineio = app[SIO].eio
        affinity = SessionAffinity(worker, route_dir, engineio.max_http_buffer_size)
        affinity.install(app, engineio)
        private_socket = str(affinity.own_socket)
    # Everything loaded so far lives as long as the process: keep it out of the collector's scans, and collect
    # the young generation less often (each reply allocates thousands of short-lived objects).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        path=private_socket,  # a worker's private socket, for requests of its sessions that other workers forward
        access_log=None,
        # run_app prints its banner once every site listens: a worker tells its supervisor then.
        print=on_listening,
        loop=new_event_loop(),
        # Replies get SHUTDOWN_GRACE in the app's own drain (on_shutdown); after it, handlers only have to return.
        shutdown_timeout=3,
        # An idle connection, and a request whose headers have not all arrived, are closed after this long
        # (aiohttp's keep-alive timer runs from the connection's start until a whole request head is parsed).
        keepalive_timeout=settings.http_keepalive_timeout,
        # Workers share one port: each has its own listening socket and the kernel spreads connections over them.
        reuse_port=worker is not None or None,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM: one process, or with WORKERS above 1 a supervisor and its workers."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.from_env()
    if options.worker is not None:
        notify = ready_notifier(options.ready_fd) if options.ready_fd is not None else None
        serve(
            worker_settings(settings, options.embedded_redis),
            worker=options.worker,
            route_dir=options.route_dir,
            on_listening=notify,
        )
    elif settings.workers > 1:
        from server.supervisor import supervise

        sys.exit(supervise(settings, new_event_loop()))
    else:
        serve(settings)


if __name__ == "__main__":
    main()
