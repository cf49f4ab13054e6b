"""Fixtures: a redis-server for the session, the provider double, chat servers, and the clients that talk to them."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestServer

from devtools.provider_double import ProviderDouble
from server.settings import Secret, Settings
from tests.clients import ConnectFactory, Http, RawSocket, Recorder, agent_client, open_http
from tests.processes import ServerProcess
from tests.servers import RedisProcess, RunningServer, ServerFactory, free_port

if TYPE_CHECKING:
    from playwright.async_api import Browser

UNIT_TESTS = Path(__file__).parent / "unit"
PROVIDER_TRANSPORTS = ("direct", "sdk")  # OPENAI_CLIENT / GEMINI_CLIENT


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets `BOTH_PROVIDER_TRANSPORTS = True` runs each of its tests against both transports.

    The direct transport is the default and every test uses it; the modules that pin what users rely on
    (failover, streaming, stop, resume) run again with the official SDKs, so neither path can drift.
    """
    if "provider_transport" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_PROVIDER_TRANSPORTS", False):
        metafunc.parametrize("provider_transport", PROVIDER_TRANSPORTS, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` (left out of `make test-fast`) what no module marks by hand.

    A test that starts whole server processes (the `processes` fixture) is slow. Of a parametrized integration
    test the quick lane runs the first case only: every case costs a server start, and what tells the cases
    apart (validation, escalation rules, failure handling) has unit tests of its own. `make test` runs them all.
    """
    for item in items:
        if "processes" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(callspec.indices.values()) and UNIT_TESTS not in item.path.parents:
            item.add_marker(pytest.mark.slow)


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
def provider_transport(request: pytest.FixtureRequest) -> str:
    """The provider transport of the test's servers: `direct`, or each one in turn (see pytest_generate_tests)."""
    return str(getattr(request, "param", "direct"))


@pytest.fixture
def settings(redis_url: str, double: ProviderDouble, tmp_path: Path, provider_transport: str) -> Settings:
    """Both providers pointed at the double, fast timeouts, streaming flushes immediate enough for tests."""
    return Settings(
        openai_client=provider_transport,
        gemini_client=provider_transport,
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


@pytest.fixture
async def start_server(settings: Settings) -> AsyncIterator[ServerFactory]:
    """Start chat servers (with optional setting overrides); all are closed after the test."""
    from server.app import create_app  # here, not at the top: the unit layer never pays for importing the app

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


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    """The test's REST client, closed after it.

    Each call gets a connection of its own (no keep-alive): tests stop and restart servers, and a pooled
    connection to a stopped one would fail the next call for a reason that is not the server's.
    """
    async with open_http(connector=aiohttp.TCPConnector(force_close=True)) as client:
        yield client


@pytest.fixture
async def connect() -> AsyncIterator[ConnectFactory]:
    """Open real Socket.IO clients; all are disconnected after the test."""
    clients: list[Recorder] = []

    async def open_client(url: str, **kwargs: Any) -> Recorder:
        recorder = Recorder()
        clients.append(recorder)
        return await recorder.connect(url, **kwargs)

    yield open_client
    for recorder in clients:
        await recorder.disconnect()


@pytest.fixture
async def agents() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    """Open agents signed in to /agents (alex's key unless told); all are disconnected after the test."""
    opened: list[Recorder] = []

    async def open_agent(url: str, key: str = "alex-key-123-4567-89ab") -> Recorder:
        agent = await agent_client(url, key)
        opened.append(agent)
        return agent

    yield open_agent
    for agent in opened:
        await agent.disconnect()


@pytest.fixture
async def raw_sockets() -> AsyncIterator[Callable[..., Awaitable[RawSocket]]]:
    """Open RawSockets (hand-written Socket.IO packets); all are closed after the test."""
    opened: list[RawSocket] = []

    async def open_raw(url: str, namespace: str = "/", auth: dict[str, Any] | None = None) -> RawSocket:
        raw = await RawSocket.open(url, namespace, auth)
        opened.append(raw)
        return raw

    yield open_raw
    for raw in opened:
        await raw.close()


@pytest.fixture
async def processes() -> AsyncIterator[list[ServerProcess]]:
    """Server processes a test launches (`launch(processes, env)`); all are stopped after it."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        await process.stop()


# --- Chromium for the browser tests (tests/test_browser*.py) ---------------------------------------------------------
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (imported here: only browser tests pay for it)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield instance
        await instance.close()


@pytest.fixture
async def browser(chromium: Browser, start_server) -> AsyncIterator[Browser]:
    """Pages are closed before the servers they talk to (this fixture is set up after start_server)."""
    yield chromium
    for context in chromium.contexts:
        await context.close()
