"""Real parts for every test: a redis-server process, the provider double over HTTP, listening servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import socketio
from aiohttp import web
from aiohttp.test_utils import TestServer

from devtools.provider_double import ProviderDouble
from server.app import create_app
from server.settings import Secret, Settings
from server.storage.redis import redis_server_binary


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A throwaway real redis-server on loopback."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None, persistent: bool = False) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
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
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_process: RedisProcess) -> str:
    """A clean database for each test."""
    client = redis.Redis.from_url(redis_process.url)
    client.flushall()
    client.close()
    return redis_process.url


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to look at what the server stored."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def double() -> AsyncIterator[ProviderDouble]:
    fake = ProviderDouble()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def cluster_env(redis_url: str, double: ProviderDouble) -> dict[str, str]:
    """The environment of a `python run.py` process on the test Redis with both providers on the double."""
    return {
        "REDIS_URL": redis_url,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": double.openai_base_url,
        "GEMINI_API_KEY": "g-test",
        "GEMINI_BASE_URL": double.gemini_base_url,
        "AGENT_API_KEYS": "alex:alex-key-123-4567-89ab",
        "AI_REQUEST_TIMEOUT": "5",
    }


@pytest.fixture
def settings(redis_url: str, double: ProviderDouble, tmp_path: Path) -> Settings:
    """Both providers pointed at the double, fast timeouts, streaming flushes immediate enough for tests."""
    return Settings(
        host="127.0.0.1",
        port=0,
        openai_api_key=Secret("sk-test-openai-key"),
        openai_base_url=double.openai_base_url,
        gemini_api_key=Secret("g-test-gemini-key"),
        gemini_base_url=double.gemini_base_url,
        ai_request_timeout=2.0,
        ai_first_token_timeout=2.0,
        ai_stream_idle_timeout=2.0,
        provider_cooldown=30.0,
        redis_url=redis_url,
        data_dir=tmp_path / "data",
        log_level="WARNING",
    )


@dataclasses.dataclass
class RunningServer:
    """A chat server listening on loopback."""

    app: web.Application
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def close(self) -> None:
        await self.server.close()


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(settings: Settings) -> AsyncIterator[ServerFactory]:
    """Start chat servers (with optional setting overrides); all are closed after the test."""
    running: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        app = create_app(dataclasses.replace(settings, **overrides))
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server()
        result = RunningServer(app, server)
        running.append(result)
        return result

    yield start
    for item in reversed(running):
        await asyncio.wait_for(item.close(), 30)


@pytest.fixture
async def server(start_server: ServerFactory) -> RunningServer:
    return await start_server()


class Recorder:
    """A python-socketio AsyncClient that keeps every event it receives, for assertions."""

    def __init__(self, namespace: str = "/") -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()

        async def catch_all(event: str, *args: Any) -> None:
            self.events.append((event, args[0] if len(args) == 1 else list(args)))
            self._changed.set()

        self.client.on("*", catch_all, namespace=namespace)

    async def connect(self, url: str, **kwargs: Any) -> Recorder:
        await self.client.connect(url, transports=["websocket"], wait_timeout=5, **kwargs)
        return self

    async def call(self, event: str, data: Any = None, timeout: float = 10) -> Any:
        return await self.client.call(event, data, timeout=timeout)

    async def emit(self, event: str, data: Any = None) -> None:
        await self.client.emit(event, data)

    def of(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    async def wait_for(
        self, event: str, predicate: Callable[[Any], bool] = lambda _: True, timeout: float = 10, count: int = 1
    ) -> list[Any]:
        """Wait until `count` events named `event` match `predicate`; returns them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [data for data in self.of(event) if predicate(data)]
            if len(found) >= count:
                return found
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {count} x {event}; got {self.events[-10:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def reply_to(self, message_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next assistant/system message-received (optionally answering a given user message)."""
        found = await self.wait_for(
            "message-received",
            lambda d: (
                d["message"]["role"] in ("assistant", "system")
                and (message_id is None or d["message"].get("replyTo") == message_id)
            ),
            timeout=timeout,
        )
        return found[0]

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.disconnect()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    """Open real Socket.IO clients; all are disconnected after the test."""
    clients: list[Recorder] = []

    async def open_client(url: str, **kwargs: Any) -> Recorder:
        recorder = Recorder()
        clients.append(recorder)
        return await recorder.connect(url, **kwargs)

    yield open_client
    for recorder in clients:
        await recorder.disconnect()


async def joined_client(connect: Callable[..., Awaitable[Recorder]], url: str, user_id: str = "u1") -> tuple[Recorder, str, str]:
    """A client that started a new session: (client, sessionId, token)."""
    client = await connect(url)
    ack = await client.call("join-chat", {"userId": user_id})
    assert ack["ok"], ack
    await client.wait_for("chat-joined")
    return client, ack["sessionId"], ack["token"]
