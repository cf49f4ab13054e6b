"""A real redis-server stopped and restarted in the middle of conversations: nothing is lost."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import redis

from tests.conftest import Recorder, RedisProcess, joined_client


async def health(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/v1/health") as response:
        body = await response.json()
        body["httpStatus"] = response.status
        return body


async def test_conversations_survive_a_redis_outage(start_server, connect, tmp_path) -> None:
    store = RedisProcess(data_dir=tmp_path / "redis", persistent=True)
    store.start()
    try:
        server = await start_server(redis_url=store.url, socketio_manager="memory")
        clients = [await joined_client(connect, server.url, f"outage-{i}") for i in range(5)]
        sent: dict[str, list[str]] = {session_id: [] for _, session_id, _ in clients}
        replies: dict[str, list[str]] = {session_id: [] for _, session_id, _ in clients}
        outage_seen = asyncio.Event()

        async def converse(client: Recorder, session_id: str) -> None:
            for n in range(12):
                ack = await client.call("send-message", {"sessionId": session_id, "message": f"{session_id[:4]} {n}"})
                assert ack["ok"], ack
                sent[session_id].append(ack["messageId"])
                reply = await client.reply_to(ack["messageId"], timeout=20)
                assert reply["message"]["role"] == "assistant"
                replies[session_id].append(reply["message"]["id"])
                await asyncio.sleep(0.1)

        async def outage() -> None:
            await asyncio.sleep(0.4)
            store.stop()
            await asyncio.sleep(0.8)
            during = await health(server.url)
            assert during["httpStatus"] == 200 and during["status"] == "degraded"
            assert during["redis"]["status"] == "down" and during["writeBehind"]["depth"] > 0
            outage_seen.set()
            await asyncio.sleep(0.4)
            store.start()

        await asyncio.gather(outage(), *(converse(client, session_id) for client, session_id, _ in clients))
        assert outage_seen.is_set()
        for _ in range(50):
            if (await health(server.url))["writeBehind"]["depth"] == 0:
                break
            await asyncio.sleep(0.1)
        after = await health(server.url)
        assert after["status"] == "ok" and after["writeBehind"]["depth"] == 0

        client = redis.Redis.from_url(store.url)
        for session_id in sent:
            stored = [orjson.loads(m) for m in client.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
            assert [m["id"] for m in stored if m["role"] == "user"] == sent[session_id]
            assert [m["id"] for m in stored if m["role"] == "assistant"] == replies[session_id]
            assert [m["role"] for m in stored] == ["user", "assistant"] * 12
        client.close()
    finally:
        store.stop()


async def test_a_full_buffer_refuses_rather_than_drops(start_server, connect, tmp_path) -> None:
    store = RedisProcess(data_dir=tmp_path / "redis", persistent=True)
    store.start()
    try:
        server = await start_server(redis_url=store.url, socketio_manager="memory", write_behind_capacity=4)
        client, session_id, _ = await joined_client(connect, server.url)
        store.stop()
        results = []
        for n in range(4):
            results.append(await client.call("send-message", {"sessionId": session_id, "message": f"m{n}"}))
            await asyncio.sleep(0.1)
        assert results[0]["ok"] is True
        refused = [r for r in results if not r["ok"]]
        assert refused and all(r["error"]["code"] == "unavailable" for r in refused)
        assert (await health(server.url))["httpStatus"] == 503
    finally:
        store.stop()
