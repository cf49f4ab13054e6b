"""WORKERS=2: one supervisor, two server processes on one port, sharing Redis (the embedded one, or REDIS_URL)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import socketio

from server.settings import PROJECT_ROOT
from tests.clients import Recorder, agent_call, open_http
from tests.processes import ServerProcess, launch
from tests.servers import free_port

pytestmark = pytest.mark.slow

AGENT_KEY = "alex-key-123-4567-89ab"


def embedded_env(tmp_path: Path, cluster_env: dict[str, str], **extra: str) -> dict[str, str]:
    """Two workers on the embedded Redis the supervisor starts under a DATA_DIR of the test's own."""
    return {**cluster_env, "WORKERS": "2", "DATA_DIR": str(tmp_path / "data"), "REDIS_URL": "", "REDIS_HOST": "", **extra}


async def workers_health(url: str, count: int = 2, tries: int = 400) -> dict[str, dict[str, Any]]:
    """/api/v1/health of every worker, by instanceId: a new connection per request until `count` have answered."""
    seen: dict[str, dict[str, Any]] = {}
    async with open_http(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(tries):
            status, health, _ = await http.get(f"{url}/api/v1/health")
            assert status == 200, health
            seen[health["instanceId"]] = health
            if len(seen) >= count:
                return seen
    raise AssertionError(f"only {sorted(seen)} answered in {tries} requests")


async def transports_per_worker(url: str) -> dict[str, int]:
    """Engine.IO transports open on each worker (a fresh reading of both)."""
    return {instance: health["engineConnections"] for instance, health in (await workers_health(url)).items()}


async def worker_of(url: str, before: dict[str, int]) -> str:
    """The worker whose transport count went up by one since `before` (the one the last client landed on)."""
    for _ in range(50):
        now = await transports_per_worker(url)
        grown = [instance for instance, count in now.items() if count == before.get(instance, 0) + 1]
        if len(grown) == 1 and sum(now.values()) == sum(before.values()) + 1:
            return grown[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no single worker gained the client: {before} -> {now}")


async def client_on(url: str, want: str | None, open_client: Any, avoid: str | None = None) -> tuple[Any, str]:
    """Open clients until one lands on worker `want` (or on any worker but `avoid`); the others are closed."""
    for _ in range(30):
        before = await transports_per_worker(url)
        client = await open_client()
        landed = await worker_of(url, before)
        if (want is None or landed == want) and landed != avoid:
            return client, landed
        await client.disconnect()
        for _ in range(50):  # wait until the closed transport is gone, so the next count starts from here
            if await transports_per_worker(url) == before:
                break
            await asyncio.sleep(0.05)
    raise AssertionError("the kernel never put a client on the other worker")


async def session_on_worker(url: str, avoid: str) -> tuple[aiohttp.ClientSession, str]:
    """A keep-alive HTTP session whose one connection is served by a worker other than `avoid`."""
    for _ in range(100):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with session.get(f"{url}/api/v1/health") as response:
            instance = (await response.json())["instanceId"]
        if instance != avoid:
            return session, instance
        await session.close()
    raise AssertionError("every connection landed on the same worker")


def worker_pids(supervisor: ServerProcess) -> set[int]:
    """The supervisor's worker processes (its children that are not redis-server)."""
    assert supervisor.process is not None
    return {
        child.pid
        for child in psutil.Process(supervisor.process.pid).children()
        if "redis-server" not in " ".join(child.cmdline())
    }


async def test_two_workers_serve_one_port_with_their_own_instance_ids(processes, cluster_env, tmp_path: Path) -> None:
    supervisor = ServerProcess(embedded_env(tmp_path, cluster_env), log_path=tmp_path / "server.log", log_level="INFO")
    processes.append(supervisor)
    await supervisor.start()
    healths = await workers_health(supervisor.url)
    assert len(healths) == 2
    assert all(h["redis"] == {"status": "ok", "mode": "embedded"} and h["status"] == "ok" for h in healths.values())
    pids = worker_pids(supervisor)
    assert len(pids) == 2
    assert {int(instance.split("-")[-2]) for instance in healths} == pids  # instanceId is host-pid-random
    log = supervisor.log()
    for pid in pids:
        assert f"started: pid {pid}" in log
    assert "2 workers serving on" in log


async def test_a_visitor_on_one_worker_and_an_agent_on_the_other_complete_a_handoff(
    processes, cluster_env, tmp_path: Path, connect, agents
) -> None:
    supervisor = await launch(processes, embedded_env(tmp_path, cluster_env, AI_PROVIDERS="local"))
    url = supervisor.url
    customer, customer_worker = await client_on(url, None, lambda: connect(url))
    agent, agent_worker = await client_on(url, None, lambda: agents(url), avoid=customer_worker)
    assert agent_worker != customer_worker

    joined = await customer.call("join-chat", {"userId": "across-workers"})
    session_id = joined["sessionId"]
    assert (await customer.call("escalate", {"sessionId": session_id, "reason": "a person, please"}))["ok"]
    await agent.wait_for("queue-updated", lambda d: any(e["sessionId"] == session_id for e in d["queue"]))
    assert (await agent_call(agent, "claim", {"sessionId": session_id}))["ok"]
    await customer.wait_for("agent-joined")
    await agent_call(agent, "agent-message", {"sessionId": session_id, "message": "Hello from the other worker"})
    got = await customer.wait_for("message-received", lambda d: d["message"]["role"] == "agent")
    assert got[0]["message"]["content"] == "Hello from the other worker"
    await customer.call("send-message", {"sessionId": session_id, "message": "Thanks, worker to worker"})
    seen = await agent.wait_for("message-received", lambda d: d["message"]["content"] == "Thanks, worker to worker")
    assert seen[0]["message"]["role"] == "user"
    assert (await agent_call(agent, "release", {"sessionId": session_id}))["ok"]
    await customer.wait_for("agent-left")


async def test_a_message_over_rest_to_one_worker_reaches_a_socket_on_the_other(processes, cluster_env, connect) -> None:
    supervisor = await launch(processes, {**cluster_env, "WORKERS": "2"})  # the operator's REDIS_URL this time
    url = supervisor.url
    watcher: Recorder
    watcher, watcher_worker = await client_on(url, None, lambda: connect(url))
    joined = await watcher.call("join-chat", {"userId": "rest-and-socket"})
    session, rest_worker = await session_on_worker(url, avoid=watcher_worker)
    try:
        async with session.post(
            f"{url}/api/v1/chat/message",
            json={"sessionId": joined["sessionId"], "message": "What is your return policy?"},
            headers={"Authorization": f"Bearer {joined['token']}"},
        ) as response:
            assert response.status == 200
            answer = await response.json()
        async with session.get(f"{url}/api/v1/health") as response:
            assert (await response.json())["instanceId"] == rest_worker  # the same connection, the same worker
    finally:
        await session.close()
    assert rest_worker != watcher_worker
    reply = await watcher.reply_to(answer["userMessage"]["id"])
    assert reply["message"]["content"] == answer["reply"]["content"]


async def test_sigterm_stops_every_worker_and_the_supervisor_cleanly(processes, cluster_env, tmp_path: Path, connect) -> None:
    supervisor = ServerProcess(embedded_env(tmp_path, cluster_env), log_path=tmp_path / "server.log", log_level="INFO")
    processes.append(supervisor)
    await supervisor.start()
    await workers_health(supervisor.url)
    pids = worker_pids(supervisor)
    assert supervisor.process is not None
    redis_pids = {c.pid for c in psutil.Process(supervisor.process.pid).children() if c.pid not in pids}
    assert len(pids) == 2 and len(redis_pids) == 1
    client = await connect(supervisor.url)
    assert (await client.call("join-chat", {"userId": "until-sigterm"}))["ok"]

    supervisor.send(signal.SIGTERM)
    assert await supervisor.exited_within(30), supervisor.log()[-3000:]
    assert supervisor.process.returncode == 0, supervisor.log()[-3000:]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids | redis_pids)
    log = supervisor.log()
    assert log.count("shutdown complete") == 2
    for pid in pids:
        assert f"(pid {pid}) stopped with code 0" in log
    assert "supervisor: stopped" in log
    assert not client.client.connected or await _disconnected(client)


async def _disconnected(client: Recorder) -> bool:
    for _ in range(50):
        if not client.client.connected:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(processes, cluster_env, tmp_path: Path) -> None:
    supervisor = ServerProcess(embedded_env(tmp_path, cluster_env), log_path=tmp_path / "server.log", log_level="INFO")
    processes.append(supervisor)
    await supervisor.start()
    first = await workers_health(supervisor.url)
    pids = worker_pids(supervisor)
    victim = min(pids)
    statuses: list[int] = []

    async def keep_asking(seconds: float) -> None:
        async with open_http(connector=aiohttp.TCPConnector(force_close=True)) as http:
            deadline = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < deadline:
                status, _, _ = await http.get(f"{supervisor.url}/health/live")
                statuses.append(status)
                await asyncio.sleep(0.01)

    asking = asyncio.create_task(keep_asking(4))
    await asyncio.sleep(0.3)
    psutil.Process(victim).kill()
    await asking
    assert statuses and set(statuses) == {200}  # the other worker took every request meanwhile

    for _ in range(100):
        now = worker_pids(supervisor)
        if len(now) == 2 and victim not in now:
            break
        await asyncio.sleep(0.1)
    assert len(now) == 2 and victim not in now
    second = await workers_health(supervisor.url)
    assert len(set(second) - set(first)) == 1  # the new worker has an instanceId of its own; the survivor kept its
    log = supervisor.log()
    assert f"(pid {victim}) exited unexpectedly with signal SIGKILL" in log
    (replacement,) = now - pids
    assert f"started: pid {replacement}" in log


async def run_to_exit(env: dict[str, str], port: int, timeout: float = 60) -> tuple[int | None, str]:
    """`python run.py` with `env` on `port`, run until it exits by itself: (exit status, everything it wrote)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROJECT_ROOT / "run.py"),
        env=ServerProcess(env, port=port, log_level="INFO").env,
        stdout=asyncio.subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, output.decode(errors="replace")


async def test_the_supervisor_exits_non_zero_when_the_port_is_taken(cluster_env, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, output = await run_to_exit(embedded_env(tmp_path, cluster_env), taken.getsockname()[1])
    assert status == 1
    assert "cannot start 2 workers: cannot listen on 127.0.0.1" in output
    assert "worker 1 started" not in output


async def test_the_supervisor_exits_non_zero_when_its_workers_cannot_start(cluster_env, tmp_path: Path) -> None:
    env = embedded_env(tmp_path, cluster_env, AI_PROVIDERS="local,bogus")  # the workers' app refuses it, not the supervisor
    status, output = await run_to_exit(env, free_port())
    assert status == 1
    assert "Unknown provider 'bogus'" in output
    assert "workers did not start: stopping the others" in output
    assert "supervisor: stopped" in output
    assert not (tmp_path / "data" / "redis.owner").exists()  # the embedded Redis was stopped too


async def _polling_chat(url: str, transports: list[str], user: str) -> tuple[str, str]:
    """A visitor whose every HTTP request opens a new connection (so it may reach either worker): join, ask, answer."""
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    client = socketio.AsyncClient(reconnection=False, http_session=http)
    try:
        await client.connect(url, transports=transports, wait_timeout=10)
        answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        client.on("message-received", answers.put)
        joined = await client.call("join-chat", {"userId": user}, timeout=10)
        sent = await client.call("send-message", {"sessionId": joined["sessionId"], "message": "What is your return policy?"})
        assert sent["ok"], sent
        while True:
            message = (await asyncio.wait_for(answers.get(), 10))["message"]
            if message["role"] == "assistant":
                break
        assert message["replyTo"] == sent["messageId"] and "30 days" in message["content"]
        for _ in range(50 if "websocket" in transports else 0):  # an upgrade to WebSocket, when offered
            if client.transport() == "websocket":
                break
            await asyncio.sleep(0.1)
        return client.eio.sid, client.transport()
    finally:
        # Without abort, python-engineio's client waits for its pending long poll (up to the 25 s ping interval).
        await client.eio.disconnect(abort=True)
        await http.close()


async def test_polling_clients_are_served_whichever_worker_their_requests_reach(processes, cluster_env, tmp_path: Path) -> None:
    supervisor = await launch(processes, embedded_env(tmp_path, cluster_env, AI_PROVIDERS="local"))
    owners = set()
    for i in range(4):  # each poll and post on a new connection: about half reach the other worker and are forwarded
        sid, transport = await _polling_chat(supervisor.url, ["polling"], f"poller-{i}")
        assert transport == "polling"
        owners.add(sid.split(".")[0])
    assert owners <= {"w1", "w2"} and owners


async def test_an_upgrade_reaching_the_other_worker_is_relayed(processes, cluster_env, tmp_path: Path) -> None:
    supervisor = await launch(processes, embedded_env(tmp_path, cluster_env, AI_PROVIDERS="local"))
    for i in range(4):  # about half of the upgrades reach the worker that does not hold the session
        _, transport = await _polling_chat(supervisor.url, ["polling", "websocket"], f"upgrader-{i}")
        assert transport == "websocket"
