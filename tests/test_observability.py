"""Metrics, liveness and readiness with real parts."""

from __future__ import annotations

import asyncio

import pytest

from server.settings import Secret
from tests.clients import joined_client, open_http


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_metrics_count_traffic_providers_breakers_and_escalations(server, connect, double, http) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "status", status=500)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "Where is my order?"})
    await client.reply_to(sent["messageId"])
    status, text = await http.get_text(f"{server.url}/metrics")
    assert status == 200
    assert sample(text, 'support_messages_total{direction="in"}') == 1
    assert sample(text, 'support_messages_total{direction="out"}') == 1
    assert sample(text, 'support_provider_requests_total{provider="openai"}') == 1
    assert sample(text, 'support_provider_failures_total{provider="openai"}') == 1
    assert sample(text, 'support_provider_requests_total{provider="gemini"}') >= 1
    assert sample(text, 'support_time_to_first_token_seconds_count{provider="gemini"}') >= 1
    assert sample(text, 'support_breaker_state{provider="openai"}') == 0
    assert sample(text, "support_sockets_connected") == 1
    assert sample(text, "support_write_behind_depth") == 0
    assert sample(text, "support_redis_command_seconds_count") >= 1
    assert "sk-test-openai-key" not in text
    sent = await client.call("send-message", {"sessionId": session_id, "message": "I want to talk to a human"})
    await client.reply_to(sent["messageId"])
    _, text = await http.get_text(f"{server.url}/metrics")
    assert sample(text, 'support_escalations_total{trigger="keyword"}') == 1


async def test_metrics_token_and_health_probes(start_server, http) -> None:
    server = await start_server(metrics_token=Secret("scrape-me"))
    assert (await http.get_text(f"{server.url}/metrics"))[0] == 401
    assert (await http.get_text(f"{server.url}/metrics", "wrong"))[0] == 401
    assert (await http.get_text(f"{server.url}/metrics", "scrape-me"))[0] == 200
    status, body = await http.get_text(f"{server.url}/health/live")
    assert status == 200 and '"ok"' in body
    status, body = await http.get_text(f"{server.url}/health/ready")
    assert status == 200 and '"ready": true' in body


async def test_feedback_and_analytics(start_server, connect, double, http) -> None:
    server = await start_server(agent_api_keys=(("ana", Secret("ana-key-2468-ace0-1357")),))
    client, session_id, token = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "hello"})
    reply = (await client.reply_to(sent["messageId"]))["message"]
    assert (await client.call("feedback", {"sessionId": session_id, "messageId": reply["id"], "rating": "down"}))["ok"]
    ack = await client.call("feedback", {"sessionId": session_id, "messageId": sent["messageId"], "rating": "up"})
    assert ack["ok"] is False and ack["error"]["code"] == "not_found"  # only replies are rated
    ack = await client.call("feedback", {"sessionId": session_id, "messageId": reply["id"], "rating": "meh"})
    assert ack["ok"] is False and ack["error"]["code"] == "validation_error"
    response = await http.post(
        f"{server.url}/api/v1/chat/feedback",
        {"sessionId": session_id, "messageId": reply["id"], "rating": "up", "comment": "thanks"},
        token,
    )
    assert response.status == 200 and response.body["rating"] == "up"
    second, other_id, _ = await joined_client(connect, server.url, "u2")
    await second.call("escalate", {"sessionId": other_id})
    await second.wait_for("escalation-needed")
    assert (await http.get_text(f"{server.url}/api/v1/analytics", token))[0] == 401
    status, text = await http.get_text(f"{server.url}/api/v1/analytics", "ana-key-2468-ace0-1357")
    assert status == 200
    import json

    days = json.loads(text)["days"]
    assert len(days) == 30
    today = days[-1]
    assert today["conversations"] == 2 and today["containmentRate"] == 0.5
    assert today["escalations"] == {"user_request": 1}
    assert today["providerShare"] == {"openai": 1.0} and today["replies"] == 1
    assert 0.9 < today["meanConfidence"] <= 1 and today["tokensUsed"] > 0
    assert today["replyLatencyMs"]["p50"] is not None
    assert today["feedback"] == {"up": 1, "down": 0, "score": 1.0}  # the later rating replaced the first


@pytest.mark.slow  # watches readiness for 8 s
async def test_a_scaled_out_server_is_ready_before_its_first_socket(start_server, http) -> None:
    """A load balancer waits for readiness before sending anyone: pub/sub must work without a visitor."""
    server = await start_server()  # external Redis: python-socketio's Redis manager and the pub/sub probe
    for _ in range(16):  # past the probe's three missed intervals (2 s each) plus slack, ready throughout
        status, body = await http.get_text(f"{server.url}/health/ready")
        assert status == 200 and '"ready": true' in body, body
        await asyncio.sleep(0.5)


@pytest.mark.slow  # waits for the pub/sub probe to give up
async def test_pubsub_is_not_ok_when_redis_is_down_at_start(start_server, tmp_path, http) -> None:
    from tests.servers import RedisProcess

    store = RedisProcess(data_dir=tmp_path / "redis")  # never started: Redis is down when the server starts
    server = await start_server(redis_url=store.url)
    status, body = await http.get_text(f"{server.url}/health/ready")
    assert status == 503 and '"pubsub": "degraded"' in body, body


@pytest.mark.slow  # a server process under 3,000 probes
async def test_readiness_under_load_before_any_visitor(redis_url, tmp_path) -> None:
    """A load balancer polling readiness hard, before any socket: ready throughout, and memory comes back."""
    from tests.processes import ServerProcess, rss_mb

    server = await ServerProcess({"REDIS_URL": redis_url, "AI_PROVIDERS": "local", "DATA_DIR": str(tmp_path)}).start()

    try:
        before = rss_mb(server.process.pid)
        gate = asyncio.Semaphore(20)
        async with open_http() as balancer:  # keep-alive connections, as a load balancer's

            async def probe() -> int:
                async with gate:
                    return (await balancer.get(f"{server.url}/health/ready")).status

            for _ in range(6):  # 6 rounds of 500 probes over ~12 s (the old deadlock showed after ~10 s)
                assert set(await asyncio.gather(*(probe() for _ in range(500)))) == {200}
                await asyncio.sleep(2)
        after = rss_mb(server.process.pid)
        assert after - before < 20, f"RSS grew from {before:.0f} MB to {after:.0f} MB"
    finally:
        await server.stop()
