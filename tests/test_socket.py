"""The Socket.IO contract with real python-socketio clients against a listening server."""

from __future__ import annotations

import asyncio

import pytest

from tests.clients import Recorder, joined_client, request
from tests.servers import RunningServer

BOTH_PROVIDER_TRANSPORTS = True  # every test here runs with OPENAI_CLIENT/GEMINI_CLIENT=direct and =sdk


async def test_join_send_and_receive_reply(server: RunningServer, connect) -> None:
    client = await connect(server.url)
    ack = await client.call("join-chat", {"userId": "visitor-7", "metadata": {"page": "/checkout"}})
    assert ack["ok"] is True and ack["sessionId"] and ack["token"]
    joined = (await client.wait_for("chat-joined"))[0]
    assert joined["sessionId"] == ack["sessionId"] and joined["userId"] == "visitor-7"
    assert joined["history"] == [] and joined["providers"] == ["openai", "gemini", "local"]

    sent = await client.call("send-message", {"sessionId": ack["sessionId"], "message": "Hello there"})
    assert sent["ok"] is True and sent["messageId"]
    received = await client.reply_to(sent["messageId"])
    message = received["message"]
    assert received["sessionId"] == ack["sessionId"] and received["escalation"] is None
    assert message["role"] == "assistant" and message["content"] == "Echo: Hello there"
    assert message["provider"] == "openai" and 0 < message["confidence"] <= 1
    assert set(message) >= {"id", "sessionId", "role", "content", "createdAt", "provider", "confidence"}


async def test_rejoin_with_token_gets_history_and_wrong_token_is_refused(server: RunningServer, connect) -> None:
    first, session_id, token = await joined_client(connect, server.url)
    sent = await first.call("send-message", {"sessionId": session_id, "message": "remember me"})
    await first.reply_to(sent["messageId"])
    await first.disconnect()

    second = await connect(server.url)
    ack = await second.call("join-chat", {"sessionId": session_id, "token": token})
    assert ack == {"ok": True, "sessionId": session_id, "token": token}
    history = (await second.wait_for("chat-joined"))[0]["history"]
    assert [m["content"] for m in history] == ["remember me", "Echo: remember me"]

    intruder = await connect(server.url)
    for payload in ({"sessionId": session_id, "token": "nope"}, {"sessionId": session_id}, {"sessionId": "x", "token": token}):
        ack = await intruder.call("join-chat", payload)
        assert ack["ok"] is False and ack["error"]["code"] in ("unauthorized", "validation_error")
    assert intruder.of("chat-joined") == []


async def test_cannot_send_or_escalate_without_joining(server: RunningServer, connect) -> None:
    _, session_id, _ = await joined_client(connect, server.url)
    stranger = await connect(server.url)
    ack = await stranger.call("send-message", {"sessionId": session_id, "message": "let me in"})
    assert ack == {"ok": False, "error": {"code": "unauthorized", "message": ack["error"]["message"]}}
    ack = await stranger.call("escalate", {"sessionId": session_id})
    assert ack["ok"] is False and ack["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("payload", [None, "text", 42, [1, 2], {"sessionId": 5, "message": "x"}])
async def test_bad_payloads_answer_validation_error_by_ack_and_by_chat_error(server: RunningServer, connect, payload) -> None:
    client = await connect(server.url)
    for event in ("join-chat", "send-message", "escalate"):
        ack = await client.call(event, payload)
        assert ack["ok"] is False and ack["error"]["code"] == "validation_error", (event, ack)
    await client.emit("send-message", payload)
    error = (await client.wait_for("chat-error"))[0]
    assert error["event"] == "send-message" and error["error"]["code"] == "validation_error"


async def test_missing_payload_is_not_ignored(server: RunningServer, connect) -> None:
    client = await connect(server.url)
    await client.client.emit("join-chat")
    error = (await client.wait_for("chat-error"))[0]
    assert error == {"event": "join-chat", "error": error["error"]} and error["error"]["code"] == "validation_error"


async def test_messages_of_one_session_are_handled_in_order(server: RunningServer, connect, double) -> None:
    double.set_mode("openai", "ok", delay=0.05)
    client, session_id, token = await joined_client(connect, server.url)
    acks = await asyncio.gather(*(client.call("send-message", {"sessionId": session_id, "message": f"m{i}"}) for i in range(5)))
    assert all(a["ok"] for a in acks)
    await client.wait_for("message-received", lambda d: d["message"]["role"] == "assistant", count=5)
    replies = [d["message"]["content"] for d in client.of("message-received") if d["message"]["role"] == "assistant"]
    order = [a["messageId"] for a in acks]
    stored = await client_history(server, session_id, token)
    users = [m for m in stored if m["role"] == "user"]
    assert sorted(m["id"] for m in users) == sorted(order)
    # user, reply, user, reply ... and every reply answers the message just before it
    for user, reply in zip(stored[::2], stored[1::2], strict=True):
        assert user["role"] == "user" and reply["content"] == f"Echo: {user['content']}"
    assert replies == [f"Echo: {m['content']}" for m in users]


@pytest.mark.slow  # slow replies on purpose
async def test_sessions_do_not_wait_for_each_other(server: RunningServer, connect, double) -> None:
    slow, slow_id, _ = await joined_client(connect, server.url, "slow")
    fast, fast_id, _ = await joined_client(connect, server.url, "fast")
    double.set_mode("openai", "ok", delay=1.5)
    await slow.call("send-message", {"sessionId": slow_id, "message": "slow one"})
    await asyncio.sleep(0.1)
    double.set_mode("openai", "ok")
    started = asyncio.get_running_loop().time()
    await fast.call("send-message", {"sessionId": fast_id, "message": "fast one"})
    await fast.reply_to()
    assert asyncio.get_running_loop().time() - started < 1.0
    await slow.reply_to(timeout=5)


@pytest.mark.slow  # a slow reply on purpose
async def test_idempotent_send_over_socket(server: RunningServer, connect, double) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    payload = {"sessionId": session_id, "message": "only once", "clientMessageId": "abc-1"}
    first = await client.call("send-message", payload)
    await client.reply_to(first["messageId"])
    again = await client.call("send-message", payload)
    assert again == first
    await asyncio.sleep(0.3)
    assert len(double.requests["openai"]) == 1
    assert len([d for d in client.of("message-received") if d["message"]["role"] == "assistant"]) == 1


async def test_every_socket_of_the_session_gets_the_reply(server: RunningServer, connect) -> None:
    first, session_id, token = await joined_client(connect, server.url)
    second: Recorder = await connect(server.url)
    assert (await second.call("join-chat", {"sessionId": session_id, "token": token}))["ok"]
    sent = await first.call("send-message", {"sessionId": session_id, "message": "both tabs"})
    for client in (first, second):
        reply = await client.reply_to(sent["messageId"])
        assert reply["message"]["content"] == "Echo: both tabs"
    await asyncio.sleep(0.2)
    assert len([d for d in second.of("message-received") if d["message"]["role"] == "assistant"]) == 1


async def test_context_window_sends_last_n_messages(start_server, connect, double) -> None:
    server = await start_server(max_conversation_history=4)
    client, session_id, _ = await joined_client(connect, server.url)
    for i in range(4):
        sent = await client.call("send-message", {"sessionId": session_id, "message": f"turn {i}"})
        await client.reply_to(sent["messageId"])
    messages = double.requests["openai"][-1]["body"]["messages"]
    assert messages[0]["role"] == "system"
    assert [m["content"] for m in messages[1:]] == ["turn 1", "Echo: turn 1", "turn 2", "Echo: turn 2", "turn 3"]


async def client_history(server: RunningServer, session_id: str, token: str) -> list[dict]:
    return (await request("GET", f"{server.url}/api/v1/chat/history/{session_id}", token=token)).body["messages"]
