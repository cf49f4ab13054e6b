"""The real parts tests run against: a throwaway redis-server, a chat server listening on loopback."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.settings import Secret
from server.storage.redis import redis_server_binary

AGENT_KEYS = (("alex", Secret("alex-key-123-4567-89ab")), ("sam", Secret("sam-key-456-7890-cdef")))
"""The agents of the handoff tests (the `agents` fixture signs in as alex unless told)."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """A throwaway real redis-server on loopback."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None, persistent: bool = False) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Where clients reach it."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Spawn redis-server and wait (up to 10 s) until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit (an AOF-persistent one has written everything by then)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@dataclasses.dataclass
class RunningServer:
    """A chat server listening on loopback."""

    app: web.Application
    server: TestServer

    @property
    def url(self) -> str:
        """Its base URL, without a trailing slash."""
        return str(self.server.make_url("")).rstrip("/")

    async def close(self) -> None:
        """Stop listening and run the app's clean-up."""
        await self.server.close()


ServerFactory = Callable[..., Awaitable[RunningServer]]
"""What the `start_server` fixture is: start a chat server with setting overrides (closed after the test)."""
