"""Streaming: coalesced chunks, stop, failover before/after the first delta, resume, SSE."""

from __future__ import annotations

import asyncio

import pytest

from tests.clients import joined_client, parse_sse

BOTH_PROVIDER_TRANSPORTS = True  # every test here runs with OPENAI_CLIENT/GEMINI_CLIENT=direct and =sdk


def chunks_for(client, message_id: str) -> list[dict]:
    return [c for c in client.of("message-chunk") if c["messageId"] == message_id]


def assert_gapless(chunks: list[dict]) -> None:
    assert [c["index"] for c in chunks] == list(range(len(chunks)))


async def test_fast_stream_is_coalesced_and_adds_up_to_the_stored_reply(server, connect, double) -> None:
    double.set_mode("openai", "ok", tokens=500)
    client, session_id, _token = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "long answer please"})
    received = await client.reply_to(sent["messageId"])
    message = received["message"]
    chunks = chunks_for(client, message["id"])
    assert_gapless(chunks)
    assert 1 <= len(chunks) < 500 / 5, len(chunks)
    assert "".join(c["delta"] for c in chunks) == message["content"]
    assert message["content"].split() == [f"tok{i}" for i in range(500)]
    assert {c["provider"] for c in chunks} == {"openai"}
    typing = client.of("assistant-typing")
    assert typing[0] == {"sessionId": session_id, "typing": True} and typing[-1]["typing"] is False


@pytest.mark.slow  # timed streams
async def test_slow_stream_flushes_by_time(start_server, connect, double) -> None:
    server = await start_server(stream_flush_ms=20, stream_flush_chars=10_000)
    double.set_mode("openai", "ok", tokens=20, chunk_delay=0.05)
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "go"})
    received = await client.reply_to(sent["messageId"])
    chunks = chunks_for(client, received["message"]["id"])
    assert len(chunks) >= 10  # each token waited longer than the flush interval
    assert "".join(c["delta"] for c in chunks) == received["message"]["content"]


async def test_stop_generation_closes_the_provider_stream_and_keeps_the_partial(server, connect, double) -> None:
    double.set_mode("openai", "ok", tokens=400, chunk_delay=0.02)
    client, session_id, _token = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "write a lot"})
    await client.wait_for("message-chunk", count=2)
    ack = await client.call("stop-generation", {"sessionId": session_id})
    assert ack == {"ok": True, "stopped": True}
    received = await client.reply_to(sent["messageId"])
    message = received["message"]
    assert message["stopped"] is True and message["provider"] == "openai"
    assert 0 < len(message["content"].split()) < 400
    assert "".join(c["delta"] for c in chunks_for(client, message["id"])) == message["content"]
    assert await double.wait_closed_early("openai", timeout=5)
    assert double.requests["gemini"] == []


@pytest.mark.slow  # timed streams
async def test_failure_before_first_delta_streams_the_next_provider_only(start_server, connect, double) -> None:
    server = await start_server(ai_first_token_timeout=0.5)
    double.set_mode("openai", "hang")
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "hello"})
    received = await client.reply_to(sent["messageId"])
    chunks = chunks_for(client, received["message"]["id"])
    assert {c["provider"] for c in chunks} == {"gemini"} and not any(c["reset"] for c in chunks)
    assert client.of("message-interrupted") == []
    assert received["message"]["provider"] == "gemini"


async def test_cut_stream_is_interrupted_and_restarted_with_reset(server, connect, double) -> None:
    double.set_mode("openai", "cut", after=3, reply="one two three four five six seven")
    client, session_id, _token = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "hello"})
    received = await client.reply_to(sent["messageId"])
    message = received["message"]
    interrupted = client.of("message-interrupted")
    assert len(interrupted) == 1 and interrupted[0]["provider"] == "openai"
    assert interrupted[0]["messageId"] == message["id"]
    chunks = chunks_for(client, message["id"])
    assert_gapless(chunks)
    gemini_chunks = [c for c in chunks if c["provider"] == "gemini"]
    assert gemini_chunks[0]["reset"] is True
    assert "".join(c["delta"] for c in gemini_chunks) == message["content"] == "Echo: hello"
    assert message["provider"] == "gemini" and "incomplete" not in message


@pytest.mark.slow  # timed streams
async def test_stalled_and_unterminated_streams_are_never_passed_off_as_answers(start_server, connect, double) -> None:
    server = await start_server(ai_stream_idle_timeout=0.5)
    client, session_id, _ = await joined_client(connect, server.url)
    for mode in ("stall", "no_finish"):
        double.set_mode("openai", mode, after=2)
        sent = await client.call("send-message", {"sessionId": session_id, "message": mode})
        received = await client.reply_to(sent["messageId"])
        assert received["message"]["provider"] == "gemini", mode
        assert received["message"]["content"] == f"Echo: {mode}"
    assert len(client.of("message-interrupted")) == 2


async def test_no_provider_left_stores_partial_as_incomplete_and_escalates(start_server, connect, double) -> None:
    server = await start_server(ai_providers=("openai", "gemini"))
    double.set_mode("both", "cut", after=2)
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "hello"})
    partial = await client.reply_to(sent["messageId"])
    assert partial["message"]["role"] == "assistant" and partial["message"]["incomplete"] is True
    system = await client.wait_for("message-received", lambda d: d["message"]["role"] == "system")
    assert system[0]["escalation"]["trigger"] == "error"


@pytest.mark.slow  # timed streams
async def test_rejoin_mid_stream_gets_text_so_far_then_the_rest(server, connect, double) -> None:
    double.set_mode("openai", "ok", tokens=60, chunk_delay=0.03)
    first, session_id, token = await joined_client(connect, server.url)
    sent = await first.call("send-message", {"sessionId": session_id, "message": "tell me"})
    await first.wait_for("message-chunk", count=3)
    await first.disconnect()
    await asyncio.sleep(0.2)

    second = await connect(server.url)
    ack = await second.call("join-chat", {"sessionId": session_id, "token": token, "afterMessageId": sent["messageId"]})
    assert ack["ok"]
    joined = (await second.wait_for("chat-joined"))[0]
    assert joined["history"] == []
    progress = joined["inProgress"]
    assert progress["text"] and progress["index"] >= 2
    received = await second.reply_to(timeout=10)
    later = [c for c in second.of("message-chunk") if c["messageId"] == progress["messageId"] and c["index"] > progress["index"]]
    assert [c["index"] for c in later] == list(range(progress["index"] + 1, progress["index"] + 1 + len(later)))
    assert progress["text"] + "".join(c["delta"] for c in later) == received["message"]["content"]
    assert received["message"]["content"].split() == [f"tok{i}" for i in range(60)]


@pytest.mark.slow  # timed streams
async def test_reply_finishes_and_is_stored_when_the_client_leaves(server, connect, double) -> None:
    double.set_mode("openai", "ok", tokens=30, chunk_delay=0.02)
    client, session_id, token = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "bye"})
    await client.disconnect()
    await asyncio.sleep(1.5)
    again = await connect(server.url)
    await again.call("join-chat", {"sessionId": session_id, "token": token, "afterMessageId": sent["messageId"]})
    joined = (await again.wait_for("chat-joined"))[0]
    assert [m["role"] for m in joined["history"]] == ["assistant"]
    assert joined["history"][0]["content"].split() == [f"tok{i}" for i in range(30)]
    assert "inProgress" not in joined


async def test_sse_endpoint_streams_chunks_then_done(server, double, http) -> None:
    double.set_mode("openai", "ok", tokens=50)
    _, session, _ = await http.post(f"{server.url}/api/v1/chat/session", {"userId": "sse"})
    url = f"{server.url}/api/v1/chat/message/stream"
    response = await http.post(url, {"sessionId": session["sessionId"], "message": "sse!"}, session["token"])
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(response.body)
    response = await http.post(url, {"sessionId": session["sessionId"], "message": "x"})
    assert response.status == 401 and response.body["error"]["code"] == "unauthorized"
    response = await http.post(url, {"sessionId": session["sessionId"]}, session["token"])
    assert response.status == 400
    chunks = [data for name, data in events if name == "chunk"]
    done = [data for name, data in events if name == "done"]
    assert chunks and len(done) == 1 and events[-1][0] == "done"
    assert "".join(c["delta"] for c in chunks) == done[0]["reply"]["content"]
    assert done[0]["reply"]["provider"] == "openai"


async def test_stop_always_wins_even_mid_redis_write(server, connect, double) -> None:
    """Cancelling a reply must never be swallowed (redis-py's read-timeout context once ate a third of them)."""
    double.set_mode("openai", "ok", tokens=400, chunk_delay=0.005)
    clients = [await joined_client(connect, server.url, f"stopper-{i}") for i in range(15)]

    async def stop_one(client, session_id: str) -> dict:
        sent = await client.call("send-message", {"sessionId": session_id, "message": "go"})
        await client.wait_for("message-chunk", count=2)
        await client.call("stop-generation", {"sessionId": session_id})
        return (await client.reply_to(sent["messageId"]))["message"]

    messages = await asyncio.gather(*(stop_one(client, session_id) for client, session_id, _ in clients))
    unstopped = [len(m["content"].split()) for m in messages if not m.get("stopped")]
    assert unstopped == [], f"replies that ran to {unstopped} tokens despite stop-generation"
    assert all(len(m["content"].split()) < 400 for m in messages)
