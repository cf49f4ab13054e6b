"""A real redis-server stopped and restarted in the middle of conversations: nothing is lost."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis

from tests.clients import Recorder, joined_client, request
from tests.servers import RedisProcess

pytestmark = pytest.mark.slow  # Redis stopped and restarted under live chats


async def health(url: str) -> dict:
    status, body, _ = await request("GET", f"{url}/api/v1/health")
    body["httpStatus"] = status
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


async def test_a_visitor_who_reconnects_during_an_outage_rejoins_and_keeps_chatting(start_server, connect, tmp_path) -> None:
    store = RedisProcess(data_dir=tmp_path / "redis", persistent=True)
    store.start()
    try:
        server = await start_server(redis_url=store.url)
        client, session_id, token = await joined_client(connect, server.url)
        sent = await client.call("send-message", {"sessionId": session_id, "message": "before the outage"})
        await client.reply_to(sent["messageId"])
        await client.disconnect()
        store.stop()

        back: Recorder = await connect(server.url)  # a new socket: its tab reconnected while Redis is down
        ack = await back.call("join-chat", {"sessionId": session_id, "token": token})
        assert ack["ok"] and ack["token"] == token, ack
        joined = (await back.wait_for("chat-joined"))[0]
        assert [m["content"] for m in joined["history"]] == ["before the outage", "Echo: before the outage"]
        during = await back.call("send-message", {"sessionId": session_id, "message": "during the outage"})
        assert during["ok"], during
        assert (await back.reply_to(during["messageId"]))["message"]["content"] == "Echo: during the outage"

        stranger: Recorder = await connect(server.url)
        refused = await stranger.call("join-chat", {"sessionId": session_id, "token": "not-the-token"})
        assert refused["ok"] is False and refused["error"]["code"] == "unavailable" and refused["retryAfter"] > 0

        store.start()
        client_redis = redis.Redis.from_url(store.url)
        for _ in range(100):
            stored = [orjson.loads(m)["content"] for m in client_redis.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
            if len(stored) == 4:
                break
            await asyncio.sleep(0.1)
        client_redis.close()
        assert stored == ["before the outage", "Echo: before the outage", "during the outage", "Echo: during the outage"]
    finally:
        store.stop()
