"""Abuse limits, binary refusal, privacy (delete, export, token rotation, masked logs)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
import socketio
from loguru import logger

from tests.clients import Http, Reply, joined_client
from tests.processes import launch

pytestmark = [
    pytest.mark.slow,  # abuse limits and privacy, timers included
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def post_session(http: Http, url: str, headers: dict[str, str] | None = None) -> Awaitable[Reply]:
    """One more new conversation for the same visitor: (status, body, headers)."""
    return http.post(f"{url}/api/v1/chat/session", {"userId": "limited"}, headers=headers)


async def test_sessions_per_ip_are_limited_with_retry_after(start_server, redis_sync, http) -> None:
    server = await start_server(rate_limit_sessions_per_minute=3)
    for _ in range(3):
        assert (await post_session(http, server.url))[0] == 201
    status, body, headers = await post_session(http, server.url)
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert len(redis_sync.keys("chat:session:*")) == 3


async def test_forwarded_for_counts_only_behind_a_trusted_proxy(start_server, http) -> None:
    untrusted = await start_server(rate_limit_sessions_per_minute=2)
    codes = [(await post_session(http, untrusted.url, {"X-Forwarded-For": f"10.0.0.{i}"}))[0] for i in range(3)]
    assert codes == [201, 201, 429]  # spoofed headers do not buy more sessions
    trusted = await start_server(rate_limit_sessions_per_minute=2, trusted_proxies=("127.0.0.1/32",))
    codes = [(await post_session(http, trusted.url, {"X-Forwarded-For": f"10.0.1.{i}"}))[0] for i in range(3)]
    assert codes == [201, 201, 201]  # each client behind the proxy has its own budget


async def test_messages_per_session_are_limited_on_sockets(start_server, connect, double) -> None:
    server = await start_server(rate_limit_messages_per_minute=2)
    client, session_id, _ = await joined_client(connect, server.url)
    for i in range(2):
        assert (await client.call("send-message", {"sessionId": session_id, "message": f"m{i}"}))["ok"]
    refused = await client.call("send-message", {"sessionId": session_id, "message": "one too many"})
    assert refused["ok"] is False and refused["error"]["code"] == "rate_limited" and refused["retryAfter"] > 0
    await asyncio.sleep(0.3)
    assert not any("one too many" in str(r["body"]) for r in double.requests["openai"])


async def test_socket_connections_per_ip_are_limited(start_server, connect) -> None:
    server = await start_server(rate_limit_connections_per_minute=2)
    await connect(server.url)
    await connect(server.url)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(server.url, wait_timeout=3)


async def test_rate_limit_holds_across_two_processes(processes, redis_url, http) -> None:
    env = {"REDIS_URL": redis_url, "AI_PROVIDERS": "local", "RATE_LIMIT_SESSIONS_PER_MINUTE": "3"}
    a = await launch(processes, env)
    b = await launch(processes, env)
    codes = [(await post_session(http, url))[0] for url in (a.url, b.url, a.url, b.url)]
    assert codes == [201, 201, 201, 429]


async def test_binary_attachments_are_refused(server, connect) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    ack = await client.call("send-message", {"sessionId": session_id, "message": b"\x00\x01binary"})
    assert ack["ok"] is False and ack["error"]["code"] == "validation_error"


async def test_export_then_delete_forgets_the_session(server, connect, redis_sync, http) -> None:
    client, session_id, token = await joined_client(connect, server.url)
    payload = {"sessionId": session_id, "message": "my email is jo@example.com", "clientMessageId": "k1"}
    sent = await client.call("send-message", payload)
    await client.reply_to(sent["messageId"])
    other = await joined_client(connect, server.url, "someone-else")
    for presented in (None, "wrong", other[2]):
        status, _, _ = await http.get(f"{server.url}/api/v1/chat/session/{session_id}/export", presented)
        assert status == 401
        status, _, _ = await http.delete(f"{server.url}/api/v1/chat/session/{session_id}", presented)
        assert status == 401
    status, export, _ = await http.get(f"{server.url}/api/v1/chat/session/{session_id}/export", token)
    assert status == 200 and export["session"]["sessionId"] == session_id
    assert export["messages"][0]["content"] == "my email is jo@example.com"
    status, body, _ = await http.delete(f"{server.url}/api/v1/chat/session/{session_id}", token)
    assert status == 200 and body["deleted"] is True
    assert [k for k in redis_sync.keys("*") if session_id.encode() in k] == []
    status, _, _ = await http.get(f"{server.url}/api/v1/chat/history/{session_id}", token)
    assert status == 401


async def test_idle_rejoin_rotates_the_token(start_server, connect, http) -> None:
    server = await start_server(token_rotate_after=0.5)
    first, session_id, old_token = await joined_client(connect, server.url)
    await first.disconnect()
    await asyncio.sleep(1.0)
    again = await connect(server.url)
    ack = await again.call("join-chat", {"sessionId": session_id, "token": old_token})
    assert ack["ok"] and ack["token"] != old_token
    status, _, _ = await http.get(f"{server.url}/api/v1/chat/history/{session_id}", old_token)
    assert status == 401
    status, _, _ = await http.get(f"{server.url}/api/v1/chat/history/{session_id}", ack["token"])
    assert status == 200


async def test_logs_mask_contact_details_and_never_hold_keys(start_server, connect) -> None:
    server = await start_server(log_level="DEBUG")
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    try:
        client, session_id, token = await joined_client(connect, server.url)
        sent = await client.call(
            "send-message",
            {"sessionId": session_id, "message": "I'm jo@example.com, card 4111 1111 1111 1111, call +1 555 123 4567"},
        )
        await client.reply_to(sent["messageId"])
    finally:
        logger.remove(sink)
    text = "\n".join(lines)
    assert "provider request" in text and "[email]" in text and "[card]" in text
    for secret in ("jo@example.com", "4111 1111 1111 1111", "555 123 4567", "sk-test-openai-key", "g-test-gemini-key", token):
        assert secret not in text


async def test_token_budget_stops_the_ai_and_offers_a_human(start_server, connect, double, http) -> None:
    server = await start_server(token_budget_per_session=25)
    client, session_id, _ = await joined_client(connect, server.url)
    first = await client.call("send-message", {"sessionId": session_id, "message": "one two three"})
    assert (await client.reply_to(first["messageId"]))["message"]["role"] == "assistant"  # 10 prompt + 4 reply tokens
    second = await client.call("send-message", {"sessionId": session_id, "message": "four five six"})
    assert (await client.reply_to(second["messageId"]))["message"]["role"] == "assistant"  # now 28 >= 25
    calls = len(double.requests["openai"])
    third = await client.call("send-message", {"sessionId": session_id, "message": "seven"})
    answer = await client.reply_to(third["messageId"])
    assert answer["message"]["role"] == "system" and "support team" in answer["message"]["content"]
    assert answer["escalation"]["trigger"] == "error"
    assert len(double.requests["openai"]) == calls
    _, health, _ = await http.get(f"{server.url}/api/v1/health")
    assert health["tokens"]["today"] >= 28


async def test_strings_are_normalized_and_control_characters_stripped(server, connect) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "Cafe\u0301 \u0007ok\u0000!"})
    reply = await client.reply_to(sent["messageId"])
    assert reply["message"]["content"] == "Echo: Caf\u00e9 ok!"
    ack = await client.call("join-chat", {"userId": "u", "metadata": {"blob": "x" * 5000}})
    assert ack["ok"] is False and "metadata" in ack["error"]["details"]


async def test_cors_origins_are_enforced_for_rest_and_socketio(start_server, http, connect) -> None:
    server = await start_server(cors_origins=("https://shop.example",))
    response = await http.request(
        "OPTIONS",
        f"{server.url}/api/v1/chat/session",
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    response = await http.post(f"{server.url}/api/v1/chat/session", {"userId": "x"}, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await http.get(f"{server.url}/")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(server.url, headers={"Origin": "https://evil.example"}, wait_timeout=3)
    good = await connect(server.url, headers={"Origin": "https://shop.example"}, wait_timeout=3)
    await good.disconnect()
