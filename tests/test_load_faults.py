"""Under concurrent load with a provider failing at random, every user message gets exactly one stored answer."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.clients import joined_client

pytestmark = pytest.mark.slow  # load with a half-failing provider


async def test_half_failing_provider_under_load_loses_and_duplicates_nothing(start_server, connect, double, redis_sync) -> None:
    server = await start_server(provider_failure_threshold=1000)  # keep OpenAI in play: half its calls fail
    double.set_mode("openai", "flaky", fail_rate=0.5)
    clients = [await joined_client(connect, server.url, f"load-{i}") for i in range(30)]

    async def converse(client, session_id: str) -> list[str]:
        ids = []
        for n in range(5):
            sent = await client.call("send-message", {"sessionId": session_id, "message": f"{session_id[:6]} #{n}"})
            assert sent["ok"], sent
            ids.append(sent["messageId"])
            await client.reply_to(sent["messageId"], timeout=20)
        return ids

    sent_ids = await asyncio.gather(*(converse(client, session_id) for client, session_id, _ in clients))
    providers = set()
    for (_, session_id, _), ids in zip(clients, sent_ids, strict=True):
        stored = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
        users = [m for m in stored if m["role"] == "user"]
        answers = [m for m in stored if m["role"] != "user"]
        assert [m["id"] for m in users] == ids
        assert sorted(m["replyTo"] for m in answers) == sorted(ids)  # exactly one answer each
        assert all(m["role"] == "assistant" for m in answers)
        providers |= {m["provider"] for m in answers}
    assert providers == {"openai", "gemini"}
