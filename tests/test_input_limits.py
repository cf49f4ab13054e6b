"""Hostile input and oversized packets against a listening server: never a 5xx, always an answer, nothing stored."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import orjson
import pytest

from server.app_keys import SIO
from server.settings import Secret
from tests.clients import Http, joined_client
from tests.servers import RunningServer, ServerFactory

# Hostile inputs over every route and event (the JSON policy alone is unit-tested: tests/unit/test_json_codec.py).
pytestmark = pytest.mark.slow

AGENT_KEY = "agent-key-for-input-tests-2718"

# Raw JSON texts every parser must refuse without falling over (the list, verbatim where it gives one).
DEEP_ARRAY = "[" * 3000 + "]" * 3000
HOSTILE_JSON: dict[str, str] = {
    "deep array 2000": "[" * 2000 + "]" * 2000,
    "deep object 1500": '{"a":' * 1500 + "1" + "}" * 1500,
    "deep array 3000": DEEP_ARRAY,
    "lone high surrogate": '{"userId": "\\ud800", "sessionId": "\\ud800", "message": "\\ud800"}',
    "lone low surrogate": '{"userId": "a\\udc00b"}',
    "reversed pair": '{"userId": "\\udc00\\ud800"}',
    "bad escape": '{"userId": "\\x41"}',
    "short unicode escape": '{"userId": "\\u12"}',
    "non-hex unicode escape": '{"userId": "\\uZZZZ"}',
    "5000-digit integer": '{"userId": "u", "metadata": {"n": ' + "9" * 5000 + "}}",
    "5000-digit negative": "-" + "1" * 5000,
    "1e400": '{"userId": "u", "metadata": {"n": 1e400}}',
    "-1e400": '{"sessionId": -1e400}',
    "5000-digit float": '{"userId": "u", "metadata": {"n": 1.' + "5" * 5000 + "e999}}",
    "NaN": '{"userId": "u", "metadata": {"n": NaN}}',
    "Infinity": '{"userId": "u", "metadata": {"n": Infinity}}',
    "-Infinity": "-Infinity",
    "nested 40 deep (over the 32 limit)": '{"userId": "u", "metadata": {"a": ' + "[" * 40 + "]" * 40 + "}}",
}
HOSTILE_BYTES: dict[str, bytes] = {
    "encoded surrogate": b'{"userId": "\xed\xa0\x80"}',
    "latin-1": '{"userId": "caf\u00e9"}'.encode("latin-1"),
    "invalid utf-8": b'{"userId": "\xff\xfe\xc3"}',
    "utf-16": '{"userId": "u"}'.encode("utf-16"),
    "nul bytes": b"\x00" * 64,
}
JSON_BODY_ROUTES = ("/api/v1/chat/session", "/api/v1/chat/message", "/api/v1/chat/message/stream", "/api/v1/chat/feedback")


async def post_raw(http: Http, url: str, body: bytes, token: str | None = None) -> tuple[int, Any]:
    """POST exact bytes as JSON; the answer's status and JSON body."""
    status, answer, _ = await http.post(url, token=token, data=body, headers={"Content-Type": "application/json"})
    return status, answer


async def start_input_server(start_server: ServerFactory) -> RunningServer:
    """Rate limits off (the tests open many sessions), one agent key for the /agents namespace."""
    server = await start_server(
        rate_limit_sessions_per_minute=0,
        rate_limit_messages_per_minute=0,
        rate_limit_connections_per_minute=0,
        agent_api_keys=(("input-agent", Secret(AGENT_KEY)),),
    )
    return server


@pytest.fixture
async def server(start_server: ServerFactory) -> RunningServer:
    return await start_input_server(start_server)


def stored_keys(redis_sync) -> set[bytes]:
    """Every key that holds conversation data (rate-limit counters are not conversation data)."""
    return {k for k in redis_sync.keys("*") if b":ratelimit:" not in k}


def event_names(server: RunningServer, namespace: str) -> list[str]:
    """Every event the server handles in a namespace, read from the live server so new events are covered too."""
    handlers = server.app[SIO].handlers.get(namespace, {})
    return sorted(name for name in handlers if name not in ("connect", "disconnect", "*"))


@pytest.mark.parametrize("route", JSON_BODY_ROUTES)
@pytest.mark.parametrize("body", list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON))
async def test_hostile_json_bodies_are_validation_errors_on_rest(server, redis_sync, route, body, http) -> None:
    session = await http.new_session(server.url, "limits")
    before = stored_keys(redis_sync)
    status, answer = await post_raw(http, server.url + route, body.encode(), session["token"])
    assert status == 400, answer
    assert answer["error"]["code"] == "validation_error" and isinstance(answer["error"]["message"], str)
    assert stored_keys(redis_sync) == before


@pytest.mark.parametrize("route", JSON_BODY_ROUTES)
@pytest.mark.parametrize("body", list(HOSTILE_BYTES.values()), ids=list(HOSTILE_BYTES))
async def test_non_utf8_bodies_are_validation_errors_on_rest(server, redis_sync, route, body, http) -> None:
    session = await http.new_session(server.url, "limits")
    before = stored_keys(redis_sync)
    status, answer = await post_raw(http, server.url + route, body, session["token"])
    assert status == 400 and answer["error"]["code"] == "validation_error", answer
    assert stored_keys(redis_sync) == before


async def test_lone_surrogate_user_id_stores_nothing(server, redis_sync, connect, http) -> None:
    status, answer = await post_raw(http, f"{server.url}/api/v1/chat/session", b'{"userId": "\\ud800"}')
    assert status == 400 and answer["error"]["code"] == "validation_error"
    client = await connect(server.url)
    ack = await client.call("join-chat", {"userId": "\ud800"})  # the python client escapes it as \ud800
    assert ack["ok"] is False and ack["error"]["code"] == "validation_error", ack
    assert redis_sync.keys("chat:session:*") == []


async def test_hostile_packets_are_acked_with_validation_error_on_every_event(server, raw_sockets, redis_sync) -> None:
    customer = await raw_sockets(server.url)
    agent = await raw_sockets(server.url, "/agents", {"key": AGENT_KEY})
    before = stored_keys(redis_sync)
    for raw, namespace in ((customer, "/"), (agent, "/agents")):
        events = event_names(server, namespace)
        assert len(events) >= 5, events
        for event, (label, text) in itertools.product(events, HOSTILE_JSON.items()):
            ack = await raw.call_raw(event, text)
            assert ack["ok"] is False, (namespace, event, label, ack)
            assert ack["error"]["code"] == "validation_error", (namespace, event, label, ack)
    assert stored_keys(redis_sync) == before
    ok = await customer.call_raw("join-chat", '{"userId": "still-alive"}')
    assert ok["ok"] is True, ok


async def test_hostile_packets_without_an_ack_get_chat_error(server, raw_sockets) -> None:
    raw = await raw_sockets(server.url)
    await raw.send_text('42["send-message",' + HOSTILE_JSON["lone high surrogate"] + "]")
    async with asyncio.timeout(10):
        while True:
            text = await raw._next_text()
            if text.startswith('42["chat-error"'):
                error = orjson.loads(text[2:])[1]
                break
    assert error["event"] == "send-message" and error["error"]["code"] == "validation_error"


async def test_duplicate_keys_take_the_last_value_on_rest_and_sockets(server, raw_sockets, http) -> None:
    status, answer = await post_raw(http, f"{server.url}/api/v1/chat/session", b'{"userId": "first", "userId": "last"}')
    assert status == 201 and answer["userId"] == "last"
    raw = await raw_sockets(server.url)
    ack = await raw.call_raw("join-chat", '{"userId": 5, "userId": "last"}')
    assert ack["ok"] is True, ack


async def test_message_over_the_limit_is_payload_too_large_on_rest(server, redis_sync, http) -> None:
    session = await http.new_session(server.url, "limits")
    url = f"{server.url}/api/v1/chat/message"
    for route in (url, url + "/stream"):
        body = orjson.dumps({"sessionId": session["sessionId"], "message": "x" * 4001})
        status, answer = await post_raw(http, route, body, session["token"])
        assert status == 413 and answer["error"]["code"] == "payload_too_large", answer
        assert "message" in answer["error"]["details"]
    assert redis_sync.llen(f"chat:history:{{{session['sessionId']}}}") == 0
    body = orjson.dumps({"sessionId": session["sessionId"], "message": "y" * 4000})
    status, answer = await post_raw(http, url, body, session["token"])
    assert status == 200 and len(answer["userMessage"]["content"]) == 4000


async def test_100kb_send_message_is_acked_payload_too_large_and_the_socket_lives_on(server, connect, redis_sync) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    ack = await client.call("send-message", {"sessionId": session_id, "message": "z" * 100_000})
    assert ack["ok"] is False and ack["error"]["code"] == "payload_too_large", ack
    assert "message" in ack["error"]["details"]
    assert redis_sync.llen(f"chat:history:{{{session_id}}}") == 0
    sent = await client.call("send-message", {"sessionId": session_id, "message": "after the big one"})
    assert sent["ok"] is True, sent
    reply = await client.reply_to(sent["messageId"])
    assert reply["message"]["content"] == "Echo: after the big one"


async def test_packets_up_to_a_megabyte_are_answered_and_larger_ones_refused(server, connect, agents) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    ack = await client.call("send-message", {"sessionId": session_id, "message": "m" * 990_000})
    assert ack["ok"] is False and ack["error"]["code"] == "payload_too_large", ack
    agent = await agents(server.url, AGENT_KEY)
    answer = await agent.call("agent-message", {"sessionId": session_id, "message": "a" * 100_000})
    assert answer["ok"] is False and answer["error"]["code"] == "payload_too_large", answer
    disconnected = asyncio.Event()
    client.client.on("disconnect", lambda *_: disconnected.set())
    await client.emit("send-message", {"sessionId": session_id, "message": "o" * 1_100_000})
    await asyncio.wait_for(disconnected.wait(), 10)  # engine.io refuses the packet and closes, as it always has
    fresh, fresh_id, _ = await joined_client(connect, server.url, "after-oversize")
    sent = await fresh.call("send-message", {"sessionId": fresh_id, "message": "hello"})
    assert sent["ok"] is True


async def test_a_100kb_rest_message_is_payload_too_large(server, redis_sync, http) -> None:
    session = await http.new_session(server.url, "limits")
    body = orjson.dumps({"sessionId": session["sessionId"], "message": "q" * 100_000})
    status, answer = await post_raw(http, f"{server.url}/api/v1/chat/message", body, session["token"])
    assert status == 413 and answer["error"]["code"] == "payload_too_large" and "body" in answer["error"]["details"]
    assert redis_sync.llen(f"chat:history:{{{session['sessionId']}}}") == 0


async def test_hostile_packet_over_long_polling_is_acked(server, redis_sync, http) -> None:
    base = f"{server.url}/socket.io/?EIO=4&transport=polling"
    _, opened = await http.get_text(base)
    sid = orjson.loads(opened[1:])["sid"]
    url = f"{base}&sid={sid}"
    response = await http.post(url, data="40")
    assert response.status == 200
    _, text = await http.get_text(url)
    assert text.startswith("40")
    response = await http.post(url, data='421["join-chat",{"userId":"\\ud800"}]')
    assert response.status == 200
    _, text = await http.get_text(url)
    packets = text.split("\x1e")
    ack = next(orjson.loads(p[3:])[0] for p in packets if p.startswith("431["))
    assert ack["ok"] is False and ack["error"]["code"] == "validation_error", ack
    assert redis_sync.keys("chat:session:*") == []


async def test_invalid_utf8_text_frame_closes_only_that_socket(server, raw_sockets, connect) -> None:
    raw = await raw_sockets(server.url)
    await raw.ws.send_frame(b'421["join-chat",{"userId":"\xff\xfe"}]', aiohttp.WSMsgType.TEXT)
    with pytest.raises(ConnectionError):  # RFC 6455: a text frame must be UTF-8, the connection is failed (1007)
        await raw.ack(1)
    _, session_id, _ = await joined_client(connect, server.url, "next-visitor")
    assert session_id
