"""Auth probes: every endpoint and event with no token, a wrong one, another session's, an expired or rotated one,
and agent keys and session tokens swapped."""

from __future__ import annotations

import asyncio

import pytest
import socketio

from server.settings import Secret
from tests.clients import joined_client

AGENT_KEY = "probe-agent-key-5150-97ce"


@pytest.fixture
async def probe_server(start_server):
    # These probes present many wrong agent keys on purpose; the sign-in lockout has its own tests (test_agent_auth).
    return await start_server(
        agent_api_keys=(("pat", Secret(AGENT_KEY)),), session_timeout_ms=2000, agent_auth_failures_per_minute=0
    )


def customer_routes(session_id: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", f"/api/v1/chat/history/{session_id}", None),
        ("POST", "/api/v1/chat/message", {"sessionId": session_id, "message": "probe"}),
        ("POST", "/api/v1/chat/message/stream", {"sessionId": session_id, "message": "probe"}),
        ("GET", f"/api/v1/chat/session/{session_id}/export", None),
        ("DELETE", f"/api/v1/chat/session/{session_id}", None),
    ]


AGENT_ROUTES = [
    ("GET", "/api/v1/tickets", None),
    ("GET", "/api/v1/tickets/T-1", None),
    ("POST", "/api/v1/tickets/T-1/resolve", {}),
]


async def test_customer_routes_refuse_every_wrong_credential(probe_server, connect, redis_sync, http) -> None:
    url = probe_server.url
    _, session_id, token = await joined_client(connect, url, "victim")
    _, _, other_token = await joined_client(connect, url, "attacker")
    for presented in (None, "", "wrong-token", other_token, AGENT_KEY, token + "x"):
        for method, path, body in customer_routes(session_id):
            status, answer, _ = await http.request(method, url + path, body, presented)
            assert status == 401 and answer["error"]["code"] == "unauthorized", (presented, method, path)
            assert "messages" not in answer and "session" not in answer
    assert redis_sync.llen(f"chat:history:{{{session_id}}}") == 0
    assert redis_sync.exists(f"chat:session:{{{session_id}}}")


async def test_agent_routes_refuse_session_tokens_and_bad_keys(probe_server, connect, http) -> None:
    _, _, token = await joined_client(connect, probe_server.url)
    for presented in (None, "wrong", token, AGENT_KEY.upper()):
        for method, path, body in AGENT_ROUTES:
            status, answer, _ = await http.request(method, probe_server.url + path, body, presented)
            assert status == 401 and answer["error"]["code"] == "unauthorized", (presented, path)
    status, _, _ = await http.request("GET", probe_server.url + "/api/v1/tickets", token=AGENT_KEY)
    assert status == 200


async def test_socket_events_refuse_sessions_not_joined_with_their_token(probe_server, connect) -> None:
    url = probe_server.url
    _, session_id, token = await joined_client(connect, url, "victim")
    _, _, other_token = await joined_client(connect, url, "attacker")
    stranger = await connect(url)
    for presented in (None, "wrong", other_token, AGENT_KEY):
        payload = {"sessionId": session_id} | ({"token": presented} if presented else {})
        ack = await stranger.call("join-chat", payload)
        assert ack["ok"] is False and ack["error"]["code"] in ("unauthorized", "validation_error")
    events = {
        "send-message": {"sessionId": session_id, "message": "probe"},
        "escalate": {"sessionId": session_id},
        "stop-generation": {"sessionId": session_id},
        "provide-contact": {"sessionId": session_id, "email": "x@example.com"},
    }
    for event, payload in events.items():
        ack = await stranger.call(event, payload)
        assert ack["ok"] is False and ack["error"]["code"] == "unauthorized", event
        ack = await stranger.call(event, payload | {"token": token})  # a token in the payload is not a join
        assert ack["ok"] is False and ack["error"]["code"] == "unauthorized", event
    assert stranger.of("chat-joined") == [] and stranger.of("message-received") == []


async def test_agent_namespace_refuses_session_tokens(probe_server, connect) -> None:
    _, _, token = await joined_client(connect, probe_server.url)
    for auth in ({"key": token}, {"token": token}, {"key": "nope"}, None):
        with pytest.raises(socketio.exceptions.ConnectionError):
            await connect(probe_server.url, namespaces=["/agents"], auth=auth, wait_timeout=3)


@pytest.mark.slow  # waits out a 2 s session TTL in Redis
async def test_expired_session_token_stops_working(probe_server, connect, http) -> None:
    first, session_id, token = await joined_client(connect, probe_server.url)
    await first.disconnect()
    await asyncio.sleep(3)  # SESSION_TIMEOUT is 2 s here
    status, answer, _ = await http.request("GET", f"{probe_server.url}/api/v1/chat/history/{session_id}", token=token)
    assert status == 401 and answer["error"]["code"] == "unauthorized"
    again = await connect(probe_server.url)
    ack = await again.call("join-chat", {"sessionId": session_id, "token": token})
    assert ack["ok"] is False and ack["error"]["code"] == "unauthorized"
