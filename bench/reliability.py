"""What the reliability guarantees cost: shutdown times, reply takeover after kill -9, spool and lease overheads.

Loopback only; stops by itself. The redis-server and the provider double come from bench/harness.py's Stack (ports
6391 and 9002, shared with `make bench`: do not run both at once); servers are `python -m run` pinned to core 0,
this process (the clients) runs on core 1.

  1 shutdown with 50 idle WebSocket clients: SIGTERM -> process exit, and -> the last client's disconnect
  2 shutdown with a reply streaming, SHUTDOWN_GRACE=1: SIGTERM -> process exit
  3 kill -9 mid-reply, two processes on one Redis: kill -> the other took the reply over, -> it stored the answer
  4 Spool.write of a buffered message (~400 bytes, fsync) on DATA_DIR's disk
  5 the per-message Lua scripts with and without the reply lease (MessageStore.append / finish_reply)

Each figure is the median of --reps runs. Writes bench/results/reliability.md and reliability.json.
Usage: .venv/bin/python bench/reliability.py [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
import socketio
from harness import (
    DOUBLE_PORT,
    LOAD_CORE,
    LOGS,
    PY,
    REDIS_PORT,
    RESULTS,
    ROOT,
    SERVER_CORE,
    Stack,
    Target,
    get_json,
    popen,
    stop,
    wait_http,
)
from scenarios import log

IDLE_PORT = 3311
IN_FLIGHT_PORT = 3312
TAKEOVER_PORTS = (3313, 3314)
IDLE_CLIENTS = 50
IDLE_GRACE = 20.0  # the default SHUTDOWN_GRACE: idle sockets must not wait for it
IN_FLIGHT_GRACE = 1.0
SLOW_100 = {"provider": "openai", "mode": "ok", "options": {"tokens": 100, "chunk_delay": 0.05}}
SLOW_60 = {"provider": "openai", "mode": "ok", "options": {"tokens": 60, "chunk_delay": 0.05}}
# A deployment on an external Redis: Socket.IO rooms and session order across processes (SOCKETIO_MANAGER=auto).
CLUSTER = {"SOCKETIO_MANAGER": "auto"}
SPOOL_WRITES = 500
LUA_CALLS = 2_000
LUA_BLOCK = 10  # calls per block between two INFO commandstats reads
LUA_ROUNDS_PER_SESSION = 2  # a fresh session every 2 rounds (about 60 messages): conversation-sized histories
CONTEXT_SIZE = 10  # MAX_CONVERSATION_HISTORY's default: what the server asks append() for
WAIT_LIMIT = 30.0  # no single wait of this script lasts longer
POLL = 0.02


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="runs of each measurement; the figures are medians")
    return parser.parse_args()


# Processes ---------------------------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` (so this run starts its own process there, and talks to no other)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def server_env(stack: Stack, data_dir: Path, **extra: str) -> dict[str, str]:
    """The bench's server environment (same Redis and double, limits off) as a cluster member with its own DATA_DIR."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return {**stack.env(), **CLUSTER, "DATA_DIR": str(data_dir), **extra}


@contextlib.contextmanager
def server_process(name: str, port: int, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """One `python -m run` on the server core, without touching Redis (for a second process beside a first)."""
    logfile = (LOGS / f"reliability-{name}.log").open("w")
    proc = popen(
        ["taskset", "-c", SERVER_CORE, PY, "-m", "run"],
        cwd=ROOT,
        env={**env, "PORT": str(port)},
        stdout=logfile,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/v1/health", proc=proc)
        yield proc
    finally:
        stop(proc, 5)
        logfile.close()


async def exit_time(proc: subprocess.Popen, seconds: float) -> float | None:
    """time.monotonic() when `proc` exited, or None when it still runs after `seconds`."""

    def waited() -> float | None:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic()

    return await asyncio.to_thread(waited)


async def poll_until(check: Callable[[], bool], seconds: float) -> bool:
    """Whether `check` came true within `seconds` (checked every POLL)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True


async def joined_client(url: str, user_id: str) -> tuple[socketio.AsyncClient, str]:
    """A WebSocket-only python-socketio client that started a session: (client, sessionId)."""
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(url, transports=["websocket"], wait_timeout=5)
    ack = await client.call("join-chat", {"userId": user_id}, timeout=10)
    if not ack or not ack.get("ok"):
        raise RuntimeError(f"join-chat failed: {ack}")
    return client, ack["sessionId"]


async def send_and_wait_first_chunk(client: socketio.AsyncClient, session_id: str, text: str) -> str:
    """Send a message, wait for the reply's first `message-chunk`; returns the user message id."""
    first_chunk = asyncio.Event()

    def on_chunk(*_: Any) -> None:
        first_chunk.set()

    client.on("message-chunk", on_chunk)
    sent = await client.call("send-message", {"sessionId": session_id, "message": text}, timeout=10)
    if not sent or not sent.get("ok"):
        raise RuntimeError(f"send-message failed: {sent}")
    await asyncio.wait_for(first_chunk.wait(), 10)
    return sent["messageId"]


def answers_to(history: list[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    """The assistant and system messages stored in reply to one user message."""
    return [m for m in history if m.get("replyTo") == message_id and m.get("role") in ("assistant", "system")]


def is_answered(answers: list[dict[str, Any]]) -> bool:
    """A whole assistant reply, or a system message (after an `incomplete` assistant one, or none)."""
    return any((m["role"] == "assistant" and not m.get("incomplete")) or m["role"] == "system" for m in answers)


def history_key(session_id: str) -> str:
    """The history list of a session (as server/storage/keys.py names it)."""
    from server.storage import keys

    return keys.history(session_id)


# 1. Shutdown with idle sockets -------------------------------------------------------------------------------------


async def _idle_shutdown(proc: subprocess.Popen, url: str) -> dict[str, Any]:
    told: dict[int, float] = {}
    clients: list[socketio.AsyncClient] = []

    async def open_one(index: int) -> None:
        client = socketio.AsyncClient(reconnection=False)

        def on_disconnect(*_: Any) -> None:
            told.setdefault(index, time.monotonic())

        client.on("disconnect", on_disconnect)
        clients.append(client)
        await client.connect(url, transports=["websocket"], wait_timeout=5)
        ack = await client.call("join-chat", {"userId": f"idle-{index}"}, timeout=10)
        if not ack or not ack.get("ok"):
            raise RuntimeError(f"join-chat failed: {ack}")

    try:
        await asyncio.gather(*(open_one(i) for i in range(IDLE_CLIENTS)))
        connected = get_json(url + "/api/v1/health")["connectedClients"]
        if connected != IDLE_CLIENTS or told:
            raise RuntimeError(f"{connected} clients connected, {len(told)} already gone; expected {IDLE_CLIENTS}, 0")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        exited = await exit_time(proc, WAIT_LIMIT)
        await poll_until(lambda: len(told) == IDLE_CLIENTS, 5)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()
    return {
        "exitSeconds": None if exited is None else exited - signalled,
        "lastDisconnectSeconds": max(told.values()) - signalled if len(told) == IDLE_CLIENTS else None,
        "firstDisconnectSeconds": min(told.values()) - signalled if told else None,
        "clientsTold": len(told),
        "exitCode": proc.returncode,
    }


def idle_shutdown(stack: Stack, data_dir: Path) -> dict[str, Any]:
    """Scenario 1: 50 joined WebSocket clients sit idle; SIGTERM; when did the process exit, when was the last told."""
    target = Target("reliability idle shutdown", [PY, "-m", "run"], IDLE_PORT)
    env = {**CLUSTER, "DATA_DIR": str(data_dir), "SHUTDOWN_GRACE": str(IDLE_GRACE)}
    data_dir.mkdir(parents=True, exist_ok=True)
    with stack.serving(target, env, tag="idle") as proc:
        return asyncio.run(_idle_shutdown(proc, target.url))


# 2. Shutdown with a reply in flight ----------------------------------------------------------------------------------


async def _in_flight_shutdown(proc: subprocess.Popen, url: str) -> dict[str, Any]:
    client, session_id = await joined_client(url, "in-flight")
    try:
        message_id = await send_and_wait_first_chunk(client, session_id, "a long answer please")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        exited = await exit_time(proc, WAIT_LIMIT)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
    return {
        "exitSeconds": None if exited is None else exited - signalled,
        "exitCode": proc.returncode,
        "sessionId": session_id,
        "messageId": message_id,
    }


def in_flight_shutdown(stack: Stack, data_dir: Path) -> dict[str, Any]:
    """Scenario 2: SIGTERM while a 5 s reply streams, SHUTDOWN_GRACE=1; when did the process exit, what was stored."""
    target = Target("reliability in-flight shutdown", [PY, "-m", "run"], IN_FLIGHT_PORT)
    env = {**CLUSTER, "DATA_DIR": str(data_dir), "SHUTDOWN_GRACE": str(IN_FLIGHT_GRACE)}
    data_dir.mkdir(parents=True, exist_ok=True)
    with stack.serving(target, env, tag="in-flight") as proc:
        stack.control(SLOW_100)
        out = asyncio.run(_in_flight_shutdown(proc, target.url))
    history = [json.loads(raw) for raw in redis.Redis.from_url(stack.redis_url).lrange(history_key(out["sessionId"]), 0, -1)]
    out["stored"] = [m["role"] + (" (incomplete)" if m.get("incomplete") else "") for m in answers_to(history, out["messageId"])]
    return out


# 3. Takeover after kill -9 -------------------------------------------------------------------------------------------


async def _takeover(a: subprocess.Popen, url_a: str, owner_a: str, redis_url: str) -> dict[str, Any]:
    import redis.asyncio as aioredis

    store = aioredis.Redis.from_url(redis_url)
    client, session_id = await joined_client(url_a, "crash-victim")
    try:
        message_id = await send_and_wait_first_chunk(client, session_id, "in flight")
        lease_expiry = await store.zscore("chat:replyleases", session_id)
        lease_left = None if lease_expiry is None else lease_expiry / 1000 - time.time()
        lock_left_ms = await store.pttl(f"chat:lock:{{{session_id}}}")  # the session lock (SOCKETIO_MANAGER=auto)
        killed = time.monotonic()
        a.kill()
        await exit_time(a, 5)
        taken_at: float | None = None
        streaming_at: float | None = None
        stored_at: float | None = None
        answers: list[dict[str, Any]] = []
        deadline = killed + WAIT_LIMIT
        while time.monotonic() < deadline:
            raw = await store.get(f"chat:pending:{{{session_id}}}")
            if taken_at is None and raw is not None and json.loads(raw).get("owner") != owner_a:
                taken_at = time.monotonic()
            if taken_at is not None and streaming_at is None and await store.exists(f"chat:inflight:{{{session_id}}}"):
                streaming_at = time.monotonic()  # the takeover dropped A's snapshot: this one is B's stream
            history = [json.loads(item) for item in await store.lrange(history_key(session_id), 0, -1)]
            answers = answers_to(history, message_id)
            if is_answered(answers):
                stored_at = time.monotonic()
                break
            await asyncio.sleep(POLL)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        await store.aclose()
    return {
        "leaseLeftAtKillSeconds": lease_left,
        "lockLeftAtKillSeconds": lock_left_ms / 1000 if lock_left_ms and lock_left_ms > 0 else None,
        "takenOverSeconds": None if taken_at is None else taken_at - killed,
        "streamingAgainSeconds": None if streaming_at is None else streaming_at - killed,
        "storedSeconds": None if stored_at is None else stored_at - killed,
        "stored": [m["role"] + (" (incomplete)" if m.get("incomplete") else "") for m in answers],
    }


def takeover(stack: Stack, data_dir: Path) -> dict[str, Any]:
    """Scenario 3: A and B on one Redis; kill -9 A mid-reply; when did B take the reply over, when did it store it."""
    stack.flush_redis()
    stack.control(SLOW_60)
    with (
        server_process("takeover-a", TAKEOVER_PORTS[0], server_env(stack, data_dir / "a")) as a,
        server_process("takeover-b", TAKEOVER_PORTS[1], server_env(stack, data_dir / "b")),
    ):
        url_a = f"http://127.0.0.1:{TAKEOVER_PORTS[0]}"
        time.sleep(0.5)  # as Stack.serving: let start-up work settle
        owner_a = get_json(url_a + "/api/v1/health")["instanceId"]
        return asyncio.run(_takeover(a, url_a, owner_a, stack.redis_url))


# 4. Spool write cost -------------------------------------------------------------------------------------------------


def spool_entry(seq: int) -> dict[str, Any]:
    """A buffered user message as WriteBehindStore spools it (404 bytes of JSON)."""
    session_id = str(uuid.uuid4())
    message = {
        "id": str(uuid.uuid4()),
        "sessionId": session_id,
        "role": "user",
        "content": "Hi, my order 48213 arrived with a cracked lid. Can I get a replacement?",
        "createdAt": "2025-06-01T12:00:00.000Z",
    }
    body = {"message": message, "clientMessageId": None, "replyId": str(uuid.uuid4())}
    return {"seq": seq, "kind": "append", "sessionId": session_id, "body": body}


def spool_base() -> Path:
    """DATA_DIR (default: the repo's data dir), where the server keeps its spool."""
    return Path(os.environ.get("DATA_DIR") or ROOT / "data")


def filesystem(path: Path) -> str:
    """`df -T`'s type and mount point of the filesystem holding `path`."""
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False).stdout.splitlines()
    fields = out[-1].split() if len(out) > 1 else []
    return f"{fields[1]} on {fields[-1]} ({fields[0]})" if len(fields) >= 7 else "unknown"


def spool_cost() -> dict[str, Any]:
    """Scenario 4: microseconds per Spool.write (append + fsync) in a temp dir under DATA_DIR."""
    from server.storage.spool import Spool

    base = spool_base()
    created = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="reliability-spool-", dir=base))
    try:
        spool = Spool(directory, "bench")
        entries = [spool_entry(seq) for seq in range(SPOOL_WRITES + 1)]
        spool.write(entries[0])  # opens and locks the file: once per process, not per write
        times = []
        for entry in entries[1:]:
            started = time.perf_counter_ns()
            spool.write(entry)
            times.append((time.perf_counter_ns() - started) / 1000)
        spool.close()
        fs = filesystem(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                base.rmdir()
    return {
        "medianUs": statistics.median(times),
        "p90Us": statistics.quantiles(times, n=10)[-1],
        "entryBytes": len(json.dumps(entries[1], separators=(",", ":")).encode()),
        "directory": str(base / "reliability-spool-*"),
        "filesystem": fs,
    }


# 5. Lua script cost of the lease -----------------------------------------------------------------------------------


async def _evalsha_stats(client: Any) -> tuple[int, int]:
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def _lua_costs(redis_url: str, calls: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from server.contract import now_iso
    from server.storage.bundle import Storage
    from server.storage.messages import ReplyLease

    client = aioredis.Redis.from_url(redis_url)
    storage = Storage.open(client, ttl_seconds=1800)
    owner = "bench-owner"

    def message(session_id: str, role: str, reply_to: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "sessionId": session_id,
            "role": role,
            "content": "Hi, my order 48213 arrived with a cracked lid. Can I get a replacement?",
            "createdAt": now_iso(),
        }
        if reply_to is not None:
            out.update(replyTo=reply_to, provider="openai", confidence=0.93)
        return out

    async def one(kind: str, session_id: str) -> None:
        if kind == "finish":
            reply = message(session_id, "assistant", reply_to=str(uuid.uuid4()))
            await storage.messages.finish_reply(
                session_id,
                [reply],
                streamed_id=reply["id"],
                attempts=[("openai", False)],
                provider="openai",
                confidence=0.93,
                latency_ms=850.0,
                tokens=120,
            )
        else:
            lease = ReplyLease(owner, str(uuid.uuid4()), 5.0) if kind == "lease" else None
            await storage.messages.append(session_id, message(session_id, "user"), context_size=CONTEXT_SIZE, lease=lease)

    kinds = ("plain", "lease", "finish")
    round_trip: dict[str, list[float]] = {k: [] for k in kinds}
    in_redis: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        session_id = (await storage.sessions.create("bench-warm-up", {}))[0].id
        for _ in range(20):  # load the scripts, warm the connection
            for kind in kinds:
                await one(kind, session_id)
        for block in range(calls // LUA_BLOCK):
            if block % LUA_ROUNDS_PER_SESSION == 0:
                session_id = (await storage.sessions.create(f"bench-{block}", {}))[0].id
            for kind in kinds[block % 3 :] + kinds[: block % 3]:  # each kind first, second and third in turn
                calls_before, usec_before = await _evalsha_stats(client)
                for _ in range(LUA_BLOCK):
                    started = time.perf_counter_ns()
                    await one(kind, session_id)
                    round_trip[kind].append((time.perf_counter_ns() - started) / 1000)
                calls_after, usec_after = await _evalsha_stats(client)
                if calls_after > calls_before:
                    in_redis[kind].append((usec_after - usec_before) / (calls_after - calls_before))
    finally:
        await client.aclose()
    out: dict[str, Any] = {}
    for kind in kinds:
        out[f"{kind}RoundTripUs"] = statistics.median(round_trip[kind])
        out[f"{kind}InRedisUs"] = statistics.median(in_redis[kind])
        out[f"{kind}Calls"] = len(round_trip[kind])
    out["leaseRatioRoundTrip"] = out["leaseRoundTripUs"] / out["plainRoundTripUs"]
    out["leaseRatioInRedis"] = out["leaseInRedisUs"] / out["plainInRedisUs"]
    return out


def lua_costs(stack: Stack) -> dict[str, Any]:
    """Scenario 5: append without and with a lease, and finish_reply of one message, interleaved, on the bench Redis."""
    stack.flush_redis()
    return asyncio.run(_lua_costs(stack.redis_url, LUA_CALLS))


# Figures -----------------------------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], key: str) -> tuple[float | None, list[float | None]]:
    """The median over runs of one measured value (runs that did not produce it are left out), and every value."""
    values = [run.get(key) for run in runs]
    present = [v for v in values if v is not None]
    return (statistics.median(present) if present else None), values


def figure(value: float | None, values: list[float | None], unit: str, digits: int) -> str:
    """`1.23 s (1.10-1.40)`: the median and the spread over runs; says how many runs failed."""
    if value is None:
        return "no result"
    present = [v for v in values if v is not None]
    text = f"{value:.{digits}f} {unit}".rstrip()
    if len(present) > 1:
        text += f" ({min(present):.{digits}f}–{max(present):.{digits}f})"
    if len(present) < len(values):
        text += f", {len(values) - len(present)} of {len(values)} runs without a result"
    return text


def build_figures(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: what, figure, how measured (plus the raw medians and per-run values for the JSON)."""
    spool = runs["spool"][0] if runs["spool"] else {}
    rows: list[dict[str, Any]] = []

    def add(key: str, scenario: str, field: str, what: str, unit: str, digits: int, how: str) -> None:
        value, values = median_of(runs[scenario], field)
        rows.append(
            {
                "key": key,
                "what": what,
                "figure": figure(value, values, unit, digits),
                "value": value,
                "unit": unit.strip(),
                "runs": values,
                "how": how,
            }
        )

    idle = (
        f"one server, external Redis, {IDLE_CLIENTS} python-socketio clients (WebSocket), each joined to a session, "
        f"idle; SHUTDOWN_GRACE={IDLE_GRACE:g}; SIGTERM to the process"
    )
    add(
        "idleShutdownExit",
        "idle",
        "exitSeconds",
        "Shutdown, 50 idle sockets: SIGTERM → process exited",
        "s",
        2,
        idle + " → waitpid returns",
    )
    add(
        "idleShutdownLastClient",
        "idle",
        "lastDisconnectSeconds",
        "Shutdown, 50 idle sockets: SIGTERM → last client saw its disconnect",
        "s",
        2,
        idle + " → the 50th client's `disconnect` event",
    )
    add(
        "inFlightShutdownExit",
        "inFlight",
        "exitSeconds",
        f"Shutdown, a reply streaming, SHUTDOWN_GRACE={IN_FLIGHT_GRACE:g}: SIGTERM → process exited",
        "s",
        2,
        "one server; the double streams 100 tokens 50 ms apart (5 s); SIGTERM after the client's first "
        "`message-chunk` → waitpid returns (the partial reply is stored as incomplete + a system message)",
    )
    takeover_how = (
        "servers A and B on one Redis (SOCKETIO_MANAGER=auto); a client on A sends a message, the double "
        "streams 60 tokens 50 ms apart; kill -9 A after the first `message-chunk`"
    )
    add(
        "takeoverTaken",
        "takeover",
        "takenOverSeconds",
        "kill -9 mid-reply: kill → the other process took the reply over",
        "s",
        2,
        takeover_how + " → `chat:pending:{sessionId}` names B as owner (Redis polled every 20 ms); "
        "bounded by the 5 s lease (renewed every 1.7 s) + the 1 s takeover check",
    )
    add(
        "takeoverStreaming",
        "takeover",
        "streamingAgainSeconds",
        "kill -9 mid-reply: kill → the other process streams it again",
        "s",
        2,
        takeover_how + " → B writes the reply's `chat:inflight:{sessionId}` snapshot; the dead process's session "
        "lock (`chat:lock:{sessionId}`) is freed by the takeover, so B streams at once",
    )
    add(
        "takeoverStored",
        "takeover",
        "storedSeconds",
        "kill -9 mid-reply: kill → the other process stored the answer",
        "s",
        2,
        takeover_how + " → `chat:history:{sessionId}` holds an assistant (whole) or system message with replyTo = "
        "the user message id; includes B streaming the 3 s reply again",
    )
    add(
        "spoolWrite",
        "spool",
        "medianUs",
        f"Spool.write of a buffered message ({spool.get('entryBytes', '?')} bytes JSON)",
        "µs",
        0,
        f"median of {SPOOL_WRITES} appends + fsync, one file, in a temp dir under DATA_DIR "
        f"({spool.get('directory', '?')}), filesystem {spool.get('filesystem', '?')}",
    )
    lua_how = (
        f"MessageStore on redis.asyncio against a real redis-server (v{runs.get('redisVersion', '?')}), "
        f"{LUA_CALLS} calls of each kind interleaved in blocks of {LUA_BLOCK} (order rotated), context_size="
        f"{CONTEXT_SIZE}; round trip = client-side median; in Redis = INFO commandstats evalsha µs/call, "
        "median over blocks"
    )
    for kind, label in (
        ("plain", "append without a lease"),
        ("lease", "append with a lease"),
        ("finish", "finish_reply of one message"),
    ):
        add(f"{kind}RoundTrip", "lua", f"{kind}RoundTripUs", f"Lua: {label}, round trip", "µs", 0, lua_how)
        add(f"{kind}InRedis", "lua", f"{kind}InRedisUs", f"Lua: {label}, time in Redis", "µs", 1, lua_how)
    add(
        "leaseRatioRoundTrip",
        "lua",
        "leaseRatioRoundTrip",
        "Lua: append with / without a lease, round trip",
        "×",
        3,
        "ratio of the two medians within each run (the machine is noisy: compared within a run), median over runs",
    )
    add(
        "leaseRatioInRedis",
        "lua",
        "leaseRatioInRedis",
        "Lua: append with / without a lease, time in Redis",
        "×",
        3,
        "ratio of the two in-Redis medians within each run, median over runs",
    )
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as a markdown table."""
    lines = [
        f"`.venv/bin/python bench/reliability.py --reps {meta['reps']}` ({meta['at']}, median of {meta['reps']} runs, "
        f"(min–max) in brackets; servers on core {SERVER_CORE}, clients on core {LOAD_CORE}, {meta['cpus']} CPUs, "
        "a shared, noisy machine)",
        "",
        "| what | figure | how measured |",
        "|---|---|---|",
    ]
    lines += [f"| {r['what']} | {r['figure']} | {r['how'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


# Main ----------------------------------------------------------------------------------------------------------------


def run_reps(
    name: str, reps: int, fn: Callable[[int], dict[str, Any]], summary: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    """Run one measurement `reps` times; a failed run is kept as an error row, not fatal."""
    out: list[dict[str, Any]] = []
    for rep in range(reps):
        try:
            result = fn(rep)
        except Exception as err:  # one failed run must not lose the others' figures
            log(f"{name} run {rep + 1} failed: {type(err).__name__}: {err}")
            result = {"error": f"{type(err).__name__}: {err}"}
        else:
            log(f"{name} run {rep + 1}: {summary(result)}")
        out.append({"rep": rep, **result})
    return out


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f} s"


def main() -> None:
    """Run the five measurements, write reliability.md and reliability.json."""
    args = parse_args()
    reps = max(1, args.reps)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up servers and the stack when terminated
    busy = [p for p in (REDIS_PORT, DOUBLE_PORT, IDLE_PORT, IN_FLIGHT_PORT, *TAKEOVER_PORTS) if not port_free(p)]
    if busy:
        sys.exit(f"ports {busy} are in use (is `make bench` or another reliability run going on?); not starting")
    sys.path.insert(0, str(ROOT))  # for server.storage
    started = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stack = Stack(ROOT)  # the Node peer is not used here; its path only ends up in the servers' environment
    data_root = Path(tempfile.mkdtemp(prefix="reliability-data-"))
    runs: dict[str, Any] = {}
    stack.start()
    try:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(0, {int(LOAD_CORE)})  # the clients beside, not on, the server's core
        runs["redisVersion"] = redis.Redis.from_url(stack.redis_url).info("server").get("redis_version")
        runs["idle"] = run_reps(
            "1 idle shutdown",
            reps,
            lambda rep: idle_shutdown(stack, data_root / f"idle-{rep}"),
            lambda r: f"exit {_seconds(r['exitSeconds'])}, last client {_seconds(r['lastDisconnectSeconds'])}",
        )
        runs["inFlight"] = run_reps(
            "2 in-flight shutdown",
            reps,
            lambda rep: in_flight_shutdown(stack, data_root / f"in-flight-{rep}"),
            lambda r: f"exit {_seconds(r['exitSeconds'])}, stored {r['stored']}",
        )
        runs["takeover"] = run_reps(
            "3 takeover",
            reps,
            lambda rep: takeover(stack, data_root / f"takeover-{rep}"),
            lambda r: (
                f"lease left {_seconds(r['leaseLeftAtKillSeconds'])}, lock left {_seconds(r['lockLeftAtKillSeconds'])}, "
                f"taken over {_seconds(r['takenOverSeconds'])}, streaming {_seconds(r['streamingAgainSeconds'])}, "
                f"stored {_seconds(r['storedSeconds'])} {r['stored']}"
            ),
        )
        runs["spool"] = run_reps(
            "4 spool",
            reps,
            lambda rep: spool_cost(),
            lambda r: f"{r['medianUs']:.0f} µs per write (p90 {r['p90Us']:.0f}), {r['filesystem']}",
        )
        runs["lua"] = run_reps(
            "5 lua",
            reps,
            lambda rep: lua_costs(stack),
            lambda r: (
                f"append {r['plainRoundTripUs']:.0f} / with lease {r['leaseRoundTripUs']:.0f} / finish "
                f"{r['finishRoundTripUs']:.0f} µs round trip; in Redis {r['plainInRedisUs']:.1f} / {r['leaseInRedisUs']:.1f} / "
                f"{r['finishInRedisUs']:.1f} µs"
            ),
        )
    finally:
        stack.close()
        shutil.rmtree(data_root, ignore_errors=True)
    meta = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wallSeconds": round(time.monotonic() - started, 1),
        "reps": reps,
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cores": {"server": int(SERVER_CORE), "clients": int(LOAD_CORE)},
    }
    rows = build_figures(runs)
    (RESULTS / "reliability.json").write_text(json.dumps({"meta": meta, "figures": rows, "runs": runs}, indent=1))
    (RESULTS / "reliability.md").write_text(markdown(rows, meta))
    print()
    for r in rows:
        print(f"{r['what']:<75} {r['figure']}")
    print(f"\nwrote {RESULTS / 'reliability.md'}, {RESULTS / 'reliability.json'} in {meta['wallSeconds']:.0f} s")


if __name__ == "__main__":
    main()
