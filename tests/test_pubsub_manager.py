"""The Socket.IO Redis manager under a burst: every cross-process emit is published, none dropped."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from server.realtime.managers import GuardedRedisManager

BURST = 400  # concurrent emits, four times redis-py's default pool of 100


async def test_a_burst_of_publishes_waits_for_connections_instead_of_dropping_emits(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Many replies streaming at once (WORKERS, a burst) publish concurrently; each one must reach the other processes.

    With redis-py's default pool the 101st concurrent publish fails with MaxConnectionsError, which the library
    takes for a lost connection: it logs an error, builds a whole new client (the old one's sockets stay open)
    and drops the emit if the retry fails too.
    """
    channel = "socketio-burst-test"
    listener = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    manager = GuardedRedisManager(redis_url, channel=channel)
    manager.json = json
    clients_before = (await listener.info("clients"))["connected_clients"]
    try:
        results = await asyncio.gather(*(manager._publish({"method": "emit", "n": n}) for n in range(BURST)))
        # The library returns None for an emit it gave up on (after logging "giving up"), else the receiver count.
        assert [r for r in results if not isinstance(r, int)] == []
        received: set[int] = set()
        async with asyncio.timeout(10):
            while len(received) < BURST:
                message = await pubsub.get_message(timeout=1)
                if message is not None:
                    received.add(json.loads(message["data"])["n"])
        assert received == set(range(BURST))
        opened = (await listener.info("clients"))["connected_clients"] - clients_before
        assert opened <= 32, f"{opened} connections for one burst"  # bounded: a burst queues, it doesn't open sockets
        assert "Cannot publish" not in caplog.text
    finally:
        await pubsub.aclose()
        await listener.aclose()
        if manager.redis is not None:
            await manager.redis.aclose()
