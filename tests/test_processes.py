"""Whole server processes started as the README says: embedded Redis persistence, and several processes on one Redis."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.clients import Recorder, agent_call, agent_client
from tests.processes import launch

pytestmark = pytest.mark.slow


async def test_embedded_redis_keeps_history_across_a_restart(processes, tmp_path: Path, http) -> None:
    env = {"DATA_DIR": str(tmp_path / "data"), "AI_PROVIDERS": "local", "REDIS_URL": "", "REDIS_HOST": ""}
    first = await launch(processes, env)
    _, health, _ = await http.get(f"{first.url}/api/v1/health")
    assert health["redis"] == {"status": "ok", "mode": "embedded"}
    _, session, _ = await http.post(f"{first.url}/api/v1/chat/session", {"userId": "persist"})
    status, answer, _ = await http.post(
        f"{first.url}/api/v1/chat/message",
        {"sessionId": session["sessionId"], "message": "What is your return policy?"},
        session["token"],
    )
    assert status == 200 and answer["reply"]["provider"] == "local" and "30 days" in answer["reply"]["content"]
    await first.stop()

    second = await launch(processes, env)
    status, history, _ = await http.get(f"{second.url}/api/v1/chat/history/{session['sessionId']}", session["token"])
    assert status == 200
    assert [m["content"] for m in history["messages"]] == ["What is your return policy?", answer["reply"]["content"]]


async def test_customer_on_one_process_agent_on_another(processes, cluster_env, connect, http) -> None:
    a = await launch(processes, cluster_env)
    b = await launch(processes, cluster_env)
    _, health_a, _ = await http.get(f"{a.url}/api/v1/health")
    _, health_b, _ = await http.get(f"{b.url}/api/v1/health")
    assert health_a["instanceId"] != health_b["instanceId"]

    agent = await agent_client(b.url, "alex-key-123-4567-89ab")
    try:
        customer: Recorder = await connect(a.url)
        joined = await customer.call("join-chat", {"userId": "across"})
        session_id = joined["sessionId"]
        await customer.call("escalate", {"sessionId": session_id, "reason": "please"})
        await agent.wait_for("queue-updated", lambda d: any(e["sessionId"] == session_id for e in d["queue"]))
        assert (await agent_call(agent, "claim", {"sessionId": session_id}))["ok"]
        await customer.wait_for("agent-joined")
        await agent_call(agent, "agent-message", {"sessionId": session_id, "message": "Hello from process B"})
        got = await customer.wait_for("message-received", lambda d: d["message"]["role"] == "agent")
        assert got[0]["message"]["content"] == "Hello from process B"
        await customer.call("send-message", {"sessionId": session_id, "message": "Hello from process A"})
        seen = await agent.wait_for("message-received", lambda d: d["message"]["content"] == "Hello from process A")
        assert seen[0]["message"]["role"] == "user"
    finally:
        await agent.disconnect()


async def test_two_sockets_of_one_session_on_two_processes_see_each_reply_once(processes, cluster_env, connect) -> None:
    a = await launch(processes, cluster_env)
    b = await launch(processes, cluster_env)
    on_a: Recorder = await connect(a.url)
    joined = await on_a.call("join-chat", {"userId": "two-tabs"})
    on_b: Recorder = await connect(b.url)
    assert (await on_b.call("join-chat", {"sessionId": joined["sessionId"], "token": joined["token"]}))["ok"]
    ids = []
    for i, client in enumerate((on_a, on_b, on_a)):
        sent = await client.call("send-message", {"sessionId": joined["sessionId"], "message": f"tab message {i}"})
        ids.append(sent["messageId"])
        for other in (on_a, on_b):
            await other.reply_to(sent["messageId"])
    await asyncio.sleep(0.5)
    for client in (on_a, on_b):
        replies = [d["message"]["replyTo"] for d in client.of("message-received") if d["message"]["role"] == "assistant"]
        assert replies == ids


async def test_rejoin_mid_stream_on_another_process_gets_the_text_so_far(processes, cluster_env, connect, double) -> None:
    double.set_mode("openai", "ok", tokens=60, chunk_delay=0.03)
    a = await launch(processes, cluster_env)
    b = await launch(processes, cluster_env)
    writer: Recorder = await connect(a.url)
    joined = await writer.call("join-chat", {"userId": "roams"})
    sent = await writer.call("send-message", {"sessionId": joined["sessionId"], "message": "tell me"})
    await writer.wait_for("message-chunk", count=3)
    await writer.disconnect()

    elsewhere: Recorder = await connect(b.url)
    ack = await elsewhere.call(
        "join-chat", {"sessionId": joined["sessionId"], "token": joined["token"], "afterMessageId": sent["messageId"]}
    )
    assert ack["ok"]
    progress = (await elsewhere.wait_for("chat-joined"))[0]["inProgress"]
    assert progress["text"] and progress["index"] >= 2
    received = await elsewhere.reply_to(timeout=10)
    chunks = elsewhere.of("message-chunk")
    later = [c for c in chunks if c["messageId"] == progress["messageId"] and c["index"] > progress["index"]]
    assert [c["index"] for c in later] == list(range(progress["index"] + 1, progress["index"] + 1 + len(later)))
    assert progress["text"] + "".join(c["delta"] for c in later) == received["message"]["content"]
    assert received["message"]["content"].split() == [f"tok{i}" for i in range(60)]


async def test_killing_a_process_and_rejoining_on_another_loses_nothing(processes, cluster_env, connect, double, http) -> None:
    a = await launch(processes, cluster_env)
    b = await launch(processes, cluster_env)
    customer: Recorder = await connect(a.url)
    joined = await customer.call("join-chat", {"userId": "survivor"})
    session_id, token = joined["sessionId"], joined["token"]
    last = None
    for i in range(3):
        sent = await customer.call("send-message", {"sessionId": session_id, "message": f"before crash {i}"})
        last = (await customer.reply_to(sent["messageId"]))["message"]["id"]
    double.set_mode("openai", "ok", tokens=40, chunk_delay=0.02)
    await customer.call("send-message", {"sessionId": session_id, "message": "in flight"})
    await customer.wait_for("message-chunk")
    await a.stop(signal.SIGKILL)
    await customer.disconnect()

    rejoined: Recorder = await connect(b.url)
    ack = await rejoined.call("join-chat", {"sessionId": session_id, "token": token, "afterMessageId": last})
    assert ack["ok"]
    history = (await rejoined.wait_for("chat-joined"))[0]["history"]
    assert [m["content"] for m in history][:1] == ["in flight"]
    _status, page, _ = await http.get(f"{b.url}/api/v1/chat/history/{session_id}", token)
    contents = [m["content"] for m in page["messages"]]
    for i in range(3):
        assert f"before crash {i}" in contents and f"Echo: before crash {i}" in contents
    double.set_mode("openai", "ok")
    # the crashed process's session lock expires within seconds, then order resumes on B
    sent = await rejoined.call("send-message", {"sessionId": session_id, "message": "after crash"}, timeout=30)
    assert (await rejoined.reply_to(sent["messageId"]))["message"]["content"] == "Echo: after crash"


async def test_pubsub_probe_reports_and_recovers_after_the_listener_is_cut(
    processes, cluster_env, connect, redis_sync, http
) -> None:
    a = await launch(processes, cluster_env)
    b = await launch(processes, cluster_env)
    for server in (a, b):
        _, health, _ = await http.get(f"{server.url}/api/v1/health")
        assert health["pubsub"] == "ok" and health["status"] == "ok"
    redis_sync.client_kill_filter(_type="pubsub")  # every process's pub/sub connection is dropped
    await asyncio.sleep(4)
    on_a: Recorder = await connect(a.url)
    joined = await on_a.call("join-chat", {"userId": "after-cut"})
    on_b: Recorder = await connect(b.url)
    assert (await on_b.call("join-chat", {"sessionId": joined["sessionId"], "token": joined["token"]}))["ok"]
    sent = await on_a.call("send-message", {"sessionId": joined["sessionId"], "message": "still connected?"})
    assert (await on_b.reply_to(sent["messageId"]))["message"]["content"] == "Echo: still connected?"
    _, health, _ = await http.get(f"{b.url}/api/v1/health")
    assert health["pubsub"] == "ok"


async def test_sigterm_during_a_stream_finishes_and_stores_the_reply(processes, cluster_env, connect, double, redis_sync) -> None:
    server = await launch(processes, {**cluster_env, "SHUTDOWN_GRACE": "10"})
    double.set_mode("openai", "ok", tokens=60, chunk_delay=0.03)
    customer: Recorder = await connect(server.url)
    joined = await customer.call("join-chat", {"userId": "deploy-day"})
    sent = await customer.call("send-message", {"sessionId": joined["sessionId"], "message": "long one"})
    await customer.wait_for("message-chunk")
    server.process.send_signal(signal.SIGTERM)
    reply = await customer.reply_to(sent["messageId"], timeout=15)
    assert reply["message"]["content"].split() == [f"tok{i}" for i in range(60)]
    await asyncio.wait_for(server.process.wait(), 20)
    stored = redis_sync.lrange(f"chat:history:{{{joined['sessionId']}}}", 0, -1)
    assert len(stored) == 2 and b'"incomplete"' not in stored[1] and b"tok59" in stored[1]
