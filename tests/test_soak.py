"""Soak: many clients talking for a while against a server process; nothing lost, nothing doubled, memory comes back.

CI runs a short version; `SOAK_CLIENTS=200 SOAK_SECONDS=60 make test PYTEST_ARGS=tests/test_soak.py` runs the full one.
"""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import pytest
import socketio

from tests.processes import launch, rss_mb

CLIENTS = int(os.environ.get("SOAK_CLIENTS", "60"))
SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))

pytestmark = pytest.mark.slow


async def test_soak_no_loss_no_duplicates_memory_returns(processes, redis_url, double, redis_sync) -> None:
    env = {
        "REDIS_URL": redis_url,
        "SOCKETIO_MANAGER": "memory",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": double.openai_base_url,
        "GEMINI_API_KEY": "g-test",
        "GEMINI_BASE_URL": double.gemini_base_url,
        "RATE_LIMIT_SESSIONS_PER_MINUTE": "0",
        "RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
        "RATE_LIMIT_CONNECTIONS_PER_MINUTE": "0",
        # Every client here shares one address: a saturated process may hold more than 50 of their messages unstored.
        "MAX_PENDING_PER_CLIENT": "0",
    }
    server = await launch(processes, env)
    pid = server.process.pid
    errors: list[str] = []

    async def one_client(i: int, deadline: float) -> tuple[str, list[str], list[str]]:
        client = socketio.AsyncClient(reconnection=False)
        received: list[dict] = []
        arrived = asyncio.Event()

        @client.on("message-received")
        async def on_message(event: dict) -> None:
            if event["message"]["role"] != "user":
                received.append(event["message"])
                arrived.set()

        @client.on("chat-error")
        async def on_error(event: dict) -> None:
            errors.append(str(event))

        await client.connect(server.url, transports=["websocket"], wait_timeout=10)
        joined = await client.call("join-chat", {"userId": f"soak-{i}"}, timeout=10)
        sent: list[str] = []
        n = 0
        while time.monotonic() < deadline:
            ack = await client.call(
                "send-message",
                {"sessionId": joined["sessionId"], "message": f"soak {i} {n}", "clientMessageId": f"c{i}-{n}"},
                timeout=15,
            )
            if not ack.get("ok"):
                errors.append(str(ack))
                break
            sent.append(ack["messageId"])
            while len(received) < len(sent):
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 15)
            n += 1
        await client.disconnect()
        return joined["sessionId"], sent, [m["id"] for m in received]

    # warm-up: one short round so imports and pools exist before the baseline
    await one_client(-1, time.monotonic() + 0.5)
    await asyncio.sleep(1)
    baseline = rss_mb(pid)
    deadline = time.monotonic() + SECONDS
    results = await asyncio.gather(*(one_client(i, deadline) for i in range(CLIENTS)))
    peak = rss_mb(pid)
    await asyncio.sleep(3)
    after = rss_mb(pid)

    assert errors == []
    total = 0
    for session_id, sent, replies in results:
        stored = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
        assert [m["id"] for m in stored if m["role"] == "user"] == sent
        answers = [m for m in stored if m["role"] != "user"]
        assert [m["id"] for m in answers] == replies
        assert sorted(m["replyTo"] for m in answers) == sorted(sent)
        total += len(sent)
    assert total >= CLIENTS
    print(f"\nsoak: {CLIENTS} clients, {SECONDS:.0f} s, {total} messages; RSS {baseline:.1f} > {peak:.1f} > {after:.1f} MB")
    assert after <= baseline + max(20.0, (peak - baseline) * 0.5)
