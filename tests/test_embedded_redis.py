"""The embedded redis-server's lifecycle with real processes: Ctrl-C, kill -9, orphans, a second server on one DATA_DIR."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis

from server.settings import PROJECT_ROOT
from server.storage.redis import redis_server_binary
from tests.clients import Http, Recorder, joined_client
from tests.processes import ServerProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's"),
]

EXIT_TIMEOUT = 120.0  # generous: these tests check that processes exit, not how fast


def running(pid: int) -> bool:
    """A live process; a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


async def gone_within(pid: int, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while running(pid):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def redis_on(data_dir: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=5)


def redis_pid(data_dir: Path) -> int:
    """The pid of whatever redis-server answers on DATA_DIR's socket."""
    client = redis_on(data_dir)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


class Server(ServerProcess):
    """`python run.py` in its own session (so a process-group signal reaches only it), its output kept in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__(env, log_path=log, log_level="INFO", new_session=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log()

    async def exited(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self, sig: int = signal.SIGTERM, grace: float = EXIT_TIMEOUT) -> None:
        await super().stop(sig, grace)


Launch = Callable[..., Awaitable[Server]]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def launch(data_dir: Path, tmp_path: Path) -> AsyncIterator[Launch]:
    """Start servers on one DATA_DIR with the embedded Redis; stop whatever is left afterwards, Redis included."""
    started: list[Server] = []
    env = {"DATA_DIR": str(data_dir), "AI_PROVIDERS": "local", "REDIS_URL": "", "REDIS_HOST": ""}

    async def start(**extra: str) -> Server:
        server = Server({**env, **extra}, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        return await server.start()

    yield start
    for server in reversed(started):
        await server.stop()
    kill_recorded_redis(data_dir)


def kill_recorded_redis(data_dir: Path) -> None:
    """A failed test must not leave a redis-server behind."""
    owner = data_dir / "redis.owner"
    if owner.exists():
        pid = json.loads(owner.read_text())["redisPid"]
        if running(pid) and Path(f"/proc/{pid}/comm").read_text().startswith("redis-server"):
            os.kill(pid, signal.SIGKILL)


def start_orphan(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on DATA_DIR's socket as an older version or a lost server left it, and a pid now dead."""
    data_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(data_dir / "redis.sock"),
            "--unixsocketperm",
            "700",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return orphan, dead.pid


async def test_kill_9_takes_the_redis_child_down_and_the_next_start_has_the_history(
    launch: Launch, data_dir: Path, http: Http
) -> None:
    first = await launch()
    child = redis_pid(data_dir)
    assert parent_of(child) == first.pid
    assert os.getsid(child) == child, "redis-server must run in its own session, away from the terminal's signals"
    assert json.loads((data_dir / "redis.owner").read_text())["serverPid"] == first.pid
    _, session, _ = await http.post(f"{first.url}/api/v1/chat/session", {"userId": "killed"})
    status, answer, _ = await http.post(
        f"{first.url}/api/v1/chat/message",
        {"sessionId": session["sessionId"], "message": "What is your return policy?"},
        session["token"],
    )
    assert status == 200

    assert first.process is not None
    first.process.kill()
    await first.exited()
    assert await gone_within(child, 10), "redis-server outlived the server that was killed with SIGKILL"
    assert "Received SIGTERM" in (data_dir / "redis.log").read_text(), "the child was not stopped through its SIGTERM path"

    second = await launch()
    assert redis_pid(data_dir) != child
    status, history, _ = await http.get(f"{second.url}/api/v1/chat/history/{session['sessionId']}", session["token"])
    assert status == 200
    assert [m["content"] for m in history["messages"]] == ["What is your return policy?", answer["reply"]["content"]]


CHILD_SCRIPT = """
import asyncio, sys
from pathlib import Path
from server.storage.redis import EmbeddedRedis

async def main():
    embedded = EmbeddedRedis(Path(sys.argv[2]))
    await embedded.start()
    print("started", flush=True)
    await asyncio.sleep(3600)

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_the_parent_death_signal_holds_under_both_event_loops(loop: str, data_dir: Path) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD_SCRIPT,
        loop,
        str(data_dir),
        cwd=str(PROJECT_ROOT),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert owner.stdout is not None
    try:
        assert await asyncio.wait_for(owner.stdout.readline(), 60) == b"started\n"
        child = redis_pid(data_dir)
        assert parent_of(child) == owner.pid
        owner.kill()
        await owner.wait()
        assert await gone_within(child, 10), f"redis-server outlived its parent under {loop}"
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()
        with contextlib.suppress(redis.RedisError, OSError):
            os.kill(redis_pid(data_dir), signal.SIGKILL)


async def test_an_orphan_with_a_dead_owner_is_taken_over_without_losing_data(launch: Launch, data_dir: Path, http: Http) -> None:
    orphan, dead = start_orphan(data_dir)
    try:
        for _ in range(200):
            try:
                if redis_on(data_dir).ping():
                    break
            except (redis.RedisError, OSError):
                await asyncio.sleep(0.025)
        client = redis_on(data_dir)
        client.set("left:by:the:orphan", "kept")
        client.rpush("left:list", *[f"item-{i}" for i in range(1000)])
        client.close()
        (data_dir / "redis.owner").write_text(json.dumps({"serverPid": dead, "redisPid": orphan.pid}))

        server = await launch()
        assert orphan.wait(timeout=15) == 0, "the orphan was not shut down cleanly"
        assert f"embedded redis-server pid {orphan.pid}" in server.output()
        assert f"recorded owner pid {dead} is gone" in server.output()
        ours = redis_pid(data_dir)
        assert ours != orphan.pid and parent_of(ours) == server.pid
        client = redis_on(data_dir)
        assert client.get("left:by:the:orphan") == b"kept"
        assert client.llen("left:list") == 1000
        client.close()
        _, health, _ = await http.get(f"{server.url}/api/v1/health")
        assert health["redis"]["status"] == "ok"

        await server.stop()
        assert server.process is not None and server.process.returncode is not None
        assert await gone_within(ours, 15), "SIGTERM to the server did not stop the redis-server it started"
        assert not (data_dir / "redis.owner").exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


async def test_ctrl_c_to_the_process_group_reaches_the_server_not_its_redis(
    launch: Launch, data_dir: Path, connect: Callable[..., Awaitable[Recorder]]
) -> None:
    server = await launch()
    child = redis_pid(data_dir)
    await joined_client(connect, server.url, "one-tab")

    os.killpg(server.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    await server.exited()
    assert await gone_within(child, 15), "the server exited and left its redis-server running"
    redis_log = (data_dir / "redis.log").read_text()
    assert "Received SIGINT" not in redis_log, "Ctrl-C reached the redis-server"
    assert "Received SIGTERM" in redis_log
    assert "handoff sweep failed" not in server.output()
    assert not (data_dir / "redis.owner").exists()


async def test_a_second_server_on_the_same_data_dir_reuses_the_live_owners_redis(
    launch: Launch, data_dir: Path, http: Http
) -> None:
    first = await launch()
    child = redis_pid(data_dir)
    second = await launch()
    assert f"owned by live server process {first.pid}: reusing it" in second.output()
    assert redis_pid(data_dir) == child

    await second.stop()
    assert running(child), "a server that merely reused the Redis stopped it"
    _, health, _ = await http.get(f"{first.url}/api/v1/health")
    assert health["redis"]["status"] == "ok"

    await first.stop()
    assert await gone_within(child, 15)
