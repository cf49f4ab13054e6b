"""Property-based fuzzing of every REST body and Socket.IO payload: a well-formed answer, never a 500, nothing stored."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.clients import Recorder, joined_client

pytestmark = pytest.mark.slow  # hypothesis over the contract

ERROR_CODES = {"validation_error", "unauthorized", "not_found", "payload_too_large", "rate_limited", "unavailable"}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
text_like = st.one_of(
    st.text(max_size=60), st.just(""), st.just("x" * 4001), st.just("\u0000\u200b\ufeff"), st.just("__own__"), json_values
)


def bodies(*keys: str) -> st.SearchStrategy:
    """Objects with the schema's keys (valid-looking or not), sometimes extra keys, or any JSON at all."""
    shaped = st.fixed_dictionaries({}, optional={k: text_like for k in keys}).flatmap(
        lambda d: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(lambda extra: {**extra, **d})
    )
    return st.one_of(shaped, json_values)


@pytest.fixture
async def server(start_server):
    """Rate limits off: the fuzzer opens far more sessions a minute than any person."""
    return await start_server(
        rate_limit_sessions_per_minute=0, rate_limit_messages_per_minute=0, rate_limit_connections_per_minute=0
    )


def assert_well_formed(status: int, body: object) -> None:
    assert status < 500 or status == 503, (status, body)
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert body["error"]["code"] in ERROR_CODES and isinstance(body["error"]["message"], str)


@FUZZ
@given(body=bodies("userId", "metadata"))
async def test_fuzz_create_session(server, redis_sync, body, http) -> None:
    before = len(redis_sync.keys("chat:session:*"))
    status, answer, _ = await http.post(f"{server.url}/api/v1/chat/session", body)
    assert_well_formed(status, answer)
    after = len(redis_sync.keys("chat:session:*"))
    assert after == before + (1 if status == 201 else 0)


@FUZZ
@given(body=bodies("sessionId", "message", "clientMessageId"))
async def test_fuzz_send_message(server, redis_sync, body, http) -> None:
    status, session, _ = await http.post(f"{server.url}/api/v1/chat/session", {"userId": "fuzz"})
    key = f"chat:history:{{{session['sessionId']}}}"
    if isinstance(body, dict) and body.get("sessionId") == "__own__":
        body["sessionId"] = session["sessionId"]
    status, answer, _ = await http.post(f"{server.url}/api/v1/chat/message", body, session["token"])
    assert_well_formed(status, answer)
    if status != 200:
        assert redis_sync.llen(key) == 0


@FUZZ
@given(query=st.dictionaries(st.sampled_from(["limit", "before", "x"]), st.text(max_size=12), max_size=3))
async def test_fuzz_history_query(server, query, http) -> None:
    _, session, _ = await http.post(f"{server.url}/api/v1/chat/session", {"userId": "fuzz"})
    response = await http.get(f"{server.url}/api/v1/chat/history/{session['sessionId']}", session["token"], params=query)
    assert_well_formed(response.status, response.body)


@FUZZ
@given(
    event=st.sampled_from(["join-chat", "send-message", "escalate", "stop-generation", "provide-contact", "claim", "nope"]),
    payload=bodies("sessionId", "token", "userId", "message", "clientMessageId", "reason", "email", "afterMessageId"),
)
@example(event="join-chat", payload={"userId": "u", "metadata": {"big": 2**70}})  # once broke the orjson codec
@example(event="send-message", payload={"sessionId": 2**70, "message": "x"})
async def test_fuzz_socket_events(server, connect, redis_sync, event, payload, http) -> None:
    client: Recorder = await connect(server.url)
    _, session_id, _ = await joined_client(connect, server.url, "fuzz-owner")
    if isinstance(payload, dict) and payload.get("sessionId") == "__own__":
        payload["sessionId"] = session_id
    before = redis_sync.llen(f"chat:history:{{{session_id}}}")
    if event == "nope":
        await client.emit(event, payload)
    else:
        ack = await client.call(event, payload)
        assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool), ack
        if not ack["ok"]:
            assert ack["error"]["code"] in ERROR_CODES, ack
    assert redis_sync.llen(f"chat:history:{{{session_id}}}") == before  # a stranger's socket stores nothing there
    await client.disconnect()
    status, _, _ = await http.get(f"{server.url}/health")
    assert status == 200
