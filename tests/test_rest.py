"""The REST contract against a listening server, real Redis and the provider double."""

from __future__ import annotations

import json

import pytest

from tests.clients import Http
from tests.servers import RunningServer

JSON = {"Content-Type": "application/json"}


async def test_create_session_returns_unguessable_ids_and_token(server: RunningServer, http: Http) -> None:
    body = await http.new_session(server.url, "alice")
    assert body["userId"] == "alice"
    assert set(body) == {"sessionId", "userId", "token", "createdAt", "expiresAt"}
    assert len(body["token"]) >= 40 and len(body["sessionId"]) >= 32
    assert body["createdAt"].endswith("Z") and body["expiresAt"] > body["createdAt"]
    other = await http.new_session(server.url, "alice")
    assert other["sessionId"] != body["sessionId"] and other["token"] != body["token"]


async def test_message_gets_openai_reply_with_confidence(server: RunningServer, double, http: Http) -> None:
    session = await http.new_session(server.url, "visitor-1")
    status, body, _ = await http.post(
        f"{server.url}/api/v1/chat/message",
        {"sessionId": session["sessionId"], "message": "Where is my parcel?"},
        session["token"],
    )
    assert status == 200, body
    assert body["sessionId"] == session["sessionId"]
    assert body["userMessage"]["role"] == "user" and body["userMessage"]["content"] == "Where is my parcel?"
    reply = body["reply"]
    assert reply["role"] == "assistant" and reply["provider"] == "openai"
    assert reply["content"] == "Echo: Where is my parcel?"
    assert 0.9 < reply["confidence"] <= 1
    assert body["escalation"] is None
    sent = double.requests["openai"][-1]["body"]
    assert sent["messages"][0]["role"] == "system"
    assert sent["messages"][-1] == {"role": "user", "content": "Where is my parcel?"}


async def test_history_pages_oldest_first_with_has_more(server: RunningServer, http: Http) -> None:
    session = await http.new_session(server.url, "visitor-1")
    for i in range(3):
        await http.post(
            f"{server.url}/api/v1/chat/message",
            {"sessionId": session["sessionId"], "message": f"question {i}"},
            session["token"],
        )
    url = f"{server.url}/api/v1/chat/history/{session['sessionId']}"
    status, body, _ = await http.get(url, session["token"])
    assert status == 200
    contents = [m["content"] for m in body["messages"]]
    assert contents == ["question 0", "Echo: question 0", "question 1", "Echo: question 1", "question 2", "Echo: question 2"]
    assert body["hasMore"] is False
    status, page, _ = await http.get(f"{url}?limit=2", session["token"])
    assert [m["content"] for m in page["messages"]] == ["question 2", "Echo: question 2"] and page["hasMore"] is True
    before = page["messages"][0]["id"]
    status, older, _ = await http.get(f"{url}?limit=3&before={before}", session["token"])
    assert [m["content"] for m in older["messages"]] == ["Echo: question 0", "question 1", "Echo: question 1"]
    assert older["hasMore"] is True


@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_history_and_message_need_the_sessions_own_token(server: RunningServer, token: str | None, http: Http) -> None:
    session = await http.new_session(server.url, "visitor-1")
    other = await http.new_session(server.url, "mallory")
    for presented in (token, other["token"]):
        status, body, _ = await http.get(f"{server.url}/api/v1/chat/history/{session['sessionId']}", presented)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, body, _ = await http.post(
            f"{server.url}/api/v1/chat/message", {"sessionId": session["sessionId"], "message": "hi"}, presented
        )
        assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body, _ = await http.get(f"{server.url}/api/v1/chat/history/no-such-session", session["token"])
    assert status == 401 and "messages" not in body


async def test_idempotent_client_message_id(server: RunningServer, double, http: Http) -> None:
    session = await http.new_session(server.url, "visitor-1")
    body = {"sessionId": session["sessionId"], "message": "hello once", "clientMessageId": "c-1"}
    _, first, _ = await http.post(f"{server.url}/api/v1/chat/message", body, session["token"])
    _, second, _ = await http.post(f"{server.url}/api/v1/chat/message", body, session["token"])
    assert second["userMessage"]["id"] == first["userMessage"]["id"]
    assert second["reply"]["id"] == first["reply"]["id"]
    assert len(double.requests["openai"]) == 1
    _, history, _ = await http.get(f"{server.url}/api/v1/chat/history/{session['sessionId']}", session["token"])
    assert len(history["messages"]) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "userId"),
        ({"userId": 42}, "userId"),
        ({"userId": ""}, "userId"),
        ({"userId": "u", "metadata": "not-an-object"}, "metadata"),
        ({"userId": "u", "surprise": 1}, "surprise"),
    ],
)
async def test_bad_session_bodies_are_validation_errors(server: RunningServer, redis_sync, body, field, http: Http) -> None:
    status, answer, _ = await http.post(f"{server.url}/api/v1/chat/session", body)
    assert status == 400
    assert answer["error"]["code"] == "validation_error" and field in answer["error"]["details"]
    assert redis_sync.keys("chat:session:*") == []


async def test_message_length_limit_is_exact(server: RunningServer, redis_sync, http: Http) -> None:
    session = await http.new_session(server.url, "visitor-1")
    url = f"{server.url}/api/v1/chat/message"
    status, body, _ = await http.post(url, {"sessionId": session["sessionId"], "message": "x" * 4001}, session["token"])
    assert status == 413 and body["error"]["code"] == "payload_too_large" and "message" in body["error"]["details"]
    assert redis_sync.llen(f"chat:history:{{{session['sessionId']}}}") == 0
    status, body, _ = await http.post(url, {"sessionId": session["sessionId"], "message": "x" * 4000}, session["token"])
    assert status == 200 and len(body["userMessage"]["content"]) == 4000


@pytest.mark.parametrize(
    "body",
    [
        {"sessionId": "s", "message": 5},
        {"sessionId": "s"},
        {"message": "hi"},
        {"sessionId": "s", "message": "   "},
        {"sessionId": ["s"], "message": "hi"},
        [1, 2, 3],
        "just a string",
        None,
    ],
)
async def test_bad_message_bodies(server: RunningServer, body, http: Http) -> None:
    session = await http.new_session(server.url, "visitor-1")
    status, answer, _ = await http.post(f"{server.url}/api/v1/chat/message", body, session["token"])
    assert status == 400 and answer["error"]["code"] == "validation_error"


async def test_invalid_json_oversized_body_and_unknown_route(server: RunningServer, http: Http) -> None:
    status, body, _ = await http.post(f"{server.url}/api/v1/chat/session", data=b"{not json", headers=JSON)
    assert status == 400 and body["error"]["code"] == "validation_error"
    status, body, _ = await http.post(
        f"{server.url}/api/v1/chat/session", data=b'{"userId": "' + b"a" * 200_000 + b'"}', headers=JSON
    )
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    status, body, _ = await http.get(f"{server.url}/api/v1/nope")
    assert status == 404 and body == {"error": {"code": "not_found", "message": "No such route."}}
    status, _, _ = await http.get(f"{server.url}/api/v1/health")
    assert status == 200


async def test_health_reports_providers_and_redis_without_secrets(server: RunningServer, http: Http) -> None:
    session = await http.new_session(server.url, "visitor-1")
    await http.post(f"{server.url}/api/v1/chat/message", {"sessionId": session["sessionId"], "message": "hi"}, session["token"])
    for path in ("/health", "/api/v1/health"):
        status, text = await http.get_text(server.url + path)
        body = json.loads(text)
        assert status == 200
        assert body["status"] == "ok" and body["redis"] == {"status": "ok", "mode": "external"}
        assert {p["name"] for p in body["providers"]} == {"openai", "gemini", "local"}
        openai_row = next(p for p in body["providers"] if p["name"] == "openai")
        assert openai_row["configured"] and openai_row["state"] == "closed" and openai_row["requests"] == 1
        assert body["activeSessions"] >= 1 and isinstance(body["connectedClients"], int)
        assert isinstance(body["uptimeSeconds"], (int, float)) and body["version"]
        assert "sk-test-openai-key" not in text and "g-test-gemini-key" not in text
