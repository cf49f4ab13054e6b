"""The shipped deployment as it is: deploy/Procfile.multi's processes on one Redis behind deploy/nginx.conf."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from devtools.provider_double import ProviderDouble
from server.settings import PROJECT_ROOT, Settings
from tests.clients import Http, Recorder, open_http, parse_sse
from tests.processes import ServerProcess, rss_mb

pytestmark = pytest.mark.slow

PROCFILE = PROJECT_ROOT / "deploy" / "Procfile.multi"
NGINX_CONF = PROJECT_ROOT / "deploy" / "nginx.conf"
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VISITOR_A = "203.0.113.10"
VISITOR_B = "198.51.100.20"


@dataclasses.dataclass
class ProcfileEntry:
    """One line of a Procfile: its name, the variables it sets and the command it runs."""

    name: str
    env: dict[str, str]
    argv: list[str]


def read_procfile(path: Path) -> list[ProcfileEntry]:
    """Parse `name: VAR=value ... command` lines as honcho/foreman would, run from the repository root."""
    entries = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        command = command.replace("${PWD}", str(PROJECT_ROOT)).replace("$PWD", str(PROJECT_ROOT))
        tokens = shlex.split(command)
        env: dict[str, str] = {}
        while tokens and ASSIGNMENT.match(tokens[0]):
            key, _, value = tokens.pop(0).partition("=")
            env[key] = value
        entries.append(ProcfileEntry(name.strip(), env, tokens))
    return entries


def nginx_binary() -> str | None:
    """The installed nginx (`make test` installs Debian's package when it can), also when /usr/sbin is not on PATH."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin")
    return found


def port_taken(port: int, host: str) -> bool:
    """Whether something already listens on host:port (the shipped files hard-code their ports)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def nginx_listen_port(conf: str) -> int:
    """The port of the config's `listen` directive."""
    match = re.search(r"^\s*listen\s+(?:[\d.]+:)?(\d+)", conf, re.MULTILINE)
    assert match, "deploy/nginx.conf has no listen directive"
    return int(match.group(1))


@dataclasses.dataclass
class Deployment:
    """The processes of deploy/Procfile.multi, started as shipped, and the URL nginx serves."""

    url: str
    web: list[ServerProcess]
    nginx: asyncio.subprocess.Process


@pytest.fixture
async def deployment(redis_url: str, double: ProviderDouble, tmp_path: Path) -> AsyncIterator[Deployment]:
    """Start every line of deploy/Procfile.multi: the `python run.py` lines on the test Redis, then nginx."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed and could not be installed (`make test` installs it with apt-get as root)")
    entries = read_procfile(PROCFILE)
    web = [e for e in entries if e.argv[:1] == ["python"]]
    front = [e for e in entries if e.argv[:1] == ["nginx"]]
    assert len(web) >= 2 and len(front) == 1, entries
    listen = nginx_listen_port(NGINX_CONF.read_text())
    busy = [(e.env.get("HOST", "127.0.0.1"), int(e.env["PORT"])) for e in web] + [("0.0.0.0", listen)]
    taken = [f"{host}:{port}" for host, port in busy if port_taken(port, host)]
    if taken:
        pytest.skip(f"the shipped deploy files use fixed ports and these are in use here: {', '.join(taken)}")

    outside = {  # what an operator exports before starting the Procfile: Redis and the providers
        "REDIS_URL": redis_url,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": double.openai_base_url,
        "GEMINI_API_KEY": "g-test",
        "GEMINI_BASE_URL": double.gemini_base_url,
        "DATA_DIR": str(tmp_path / "data"),
    }
    processes: list[ServerProcess] = []
    nginx: asyncio.subprocess.Process | None = None
    try:
        for i, entry in enumerate(web):
            assert entry.argv == ["python", "run.py"], entry
            assert entry.env.get("TRUSTED_PROXIES"), f"{entry.name} does not trust nginx: every visitor is one IP"
            process = ServerProcess({**outside, **entry.env}, port=int(entry.env["PORT"]), log_path=tmp_path / f"web{i}.log")
            processes.append(process)
            await process.start()
        with (tmp_path / "nginx.log").open("wb") as log:
            nginx = await asyncio.create_subprocess_exec(
                binary,
                *front[0].argv[1:],
                env={**os.environ, **front[0].env},
                cwd=str(PROJECT_ROOT),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        url = f"http://127.0.0.1:{listen}"
        await wait_until_serving(url, nginx, tmp_path / "nginx.log")
        yield Deployment(url, processes, nginx)
    finally:
        if nginx is not None and nginx.returncode is None:
            nginx.send_signal(signal.SIGTERM)  # fast shutdown of the master and its workers
            try:
                await asyncio.wait_for(nginx.wait(), 10)
            except TimeoutError:
                nginx.kill()
                await nginx.wait()
        for process in processes:
            await process.stop()


def output_of(log: Path) -> str:
    """What nginx wrote (its error log goes to stderr), for a failure message."""
    return log.read_text(errors="replace")[-4000:]


async def wait_until_serving(url: str, nginx: asyncio.subprocess.Process, log: Path, timeout: float = 15) -> None:
    """Wait until nginx answers /health from a process behind it; fail with nginx's own output if it died."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with open_http() as http:
        while asyncio.get_running_loop().time() < deadline:
            if nginx.returncode is not None:
                raise AssertionError(f"nginx -c deploy/nginx.conf exited with {nginx.returncode}:\n{output_of(log)}")
            with contextlib.suppress(aiohttp.ClientError):
                if (await http.get(f"{url}/health")).status == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"nginx did not serve /health in {timeout} s:\n{output_of(log)}")


async def new_session(http: Http, url: str, visitor: str, user: str) -> tuple[int, dict[str, Any]]:
    """POST /api/v1/chat/session through nginx as a visitor whose address nginx puts in X-Forwarded-For."""
    status, body, _ = await http.post(f"{url}/api/v1/chat/session", {"userId": user}, headers={"X-Forwarded-For": visitor})
    return status, body


async def test_one_visitor_at_the_session_limit_does_not_lock_out_another(deployment: Deployment, redis_url: str) -> None:
    limit = Settings().rate_limit_sessions_per_minute  # the Procfile leaves the limit at its default
    before = [rss_mb(process.process.pid) for process in deployment.web]
    gate = asyncio.Semaphore(16)
    async with open_http() as http:  # keep-alive through nginx, as browsers do

        async def open_one(i: int) -> int:
            async with gate:
                status, _ = await new_session(http, deployment.url, VISITOR_A, f"a{i}")
                return status

        statuses = await asyncio.gather(*(open_one(i) for i in range(limit)))
        assert set(statuses) == {201}, sorted(set(statuses))
        status, body = await new_session(http, deployment.url, VISITOR_A, "a-over")
        assert status == 429 and body["error"]["code"] == "rate_limited", body
        status, body = await new_session(http, deployment.url, VISITOR_B, "b")
        assert status == 201 and body["sessionId"], body
    grown = [rss_mb(process.process.pid) - mb for process, mb in zip(deployment.web, before, strict=True)]
    assert max(grown) < 30, f"server RSS grew by {grown} MB over {limit} sessions"  # measured: a few MB
    # A visitor cannot move to another address by writing its own X-Forwarded-For: nginx appends the peer,
    # and the process only skips hops it trusts. Here the peer is 127.0.0.1, so the test's header decides;
    # in production the peer is the visitor's own public address.

    visitor_c = "192.0.2.30"
    socket_client = Recorder()
    await socket_client.connect(deployment.url, headers={"X-Forwarded-For": visitor_c})
    try:
        assert (await socket_client.call("join-chat", {"userId": "c"}))["ok"]
    finally:
        await socket_client.disconnect()

    keys = [k.decode() for k in redis.Redis.from_url(redis_url).keys("*")]
    for visitor in (VISITOR_A, VISITOR_B, visitor_c):
        assert any(visitor in key for key in keys), (visitor, keys)
    assert not [key for key in keys if "127.0.0.1" in key], "a limit keyed on nginx's address"


async def chat_once(client: Recorder, user: str) -> dict[str, Any]:
    """Join, send one message and wait for the assistant's reply."""
    joined = await client.call("join-chat", {"userId": user})
    assert joined["ok"], joined
    sent = await client.call("send-message", {"sessionId": joined["sessionId"], "message": f"hello from {user}"})
    assert sent["ok"], sent
    received = await client.reply_to(sent["messageId"])
    return received["message"]


async def test_socketio_over_websocket_and_polling_and_sse_through_nginx(deployment: Deployment, http: Http) -> None:
    websocket = Recorder()
    await websocket.connect(deployment.url, headers={"X-Forwarded-For": VISITOR_A})
    polling = Recorder()
    await polling.client.connect(deployment.url, transports=["polling"], headers={"X-Forwarded-For": VISITOR_B}, wait_timeout=5)
    try:
        assert websocket.client.transport() == "websocket" and polling.client.transport() == "polling"
        for client, user in ((websocket, "ws-visitor"), (polling, "polling-visitor")):
            reply = await chat_once(client, user)
            assert reply["role"] == "assistant" and reply["provider"] == "openai" and reply["content"], reply
    finally:
        await websocket.disconnect()
        # A graceful polling disconnect waits for the pending long poll (up to the ping interval, ~25 s);
        # abort sends the close packet and drops the poll at once.
        with contextlib.suppress(Exception):
            await polling.client.eio.disconnect(abort=True)

    status, session = await new_session(http, deployment.url, VISITOR_A, "sse-visitor")
    assert status == 201
    headers = {"X-Forwarded-For": VISITOR_A}
    body = {"sessionId": session["sessionId"], "message": "stream through nginx"}
    response = await http.post(f"{deployment.url}/api/v1/chat/message/stream", body, session["token"], headers=headers)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(response.body)
    names = [name for name, _ in events]
    assert names[0] == "accepted" and names[-1] == "done" and "chunk" in names, names
