"""Escalation that reaches a person: queue, claim, live messages, release, close, tickets."""

from __future__ import annotations

import asyncio

import pytest
import socketio

from tests.clients import agent_call, joined_client
from tests.servers import AGENT_KEYS


@pytest.fixture
async def handoff_server(start_server):
    return await start_server(agent_api_keys=AGENT_KEYS, agent_wait_timeout=30.0)


async def test_full_handoff_round_trip(handoff_server, connect, agents, double, http) -> None:
    url = handoff_server.url
    agent = await agents(url)
    assert (await agent_call(agent, "get-queue"))["queue"] == []
    customer, session_id, token = await joined_client(connect, url)
    sent = await customer.call("send-message", {"sessionId": session_id, "message": "My order #1234 never arrived"})
    await customer.reply_to(sent["messageId"])

    assert (await customer.call("escalate", {"sessionId": session_id, "reason": "wants a person"}))["ok"]
    updated = await agent.wait_for("queue-updated", lambda d: len(d["queue"]) == 1)
    entry = updated[-1]["queue"][0]
    assert entry["sessionId"] == session_id and entry["userId"] == "u1"
    assert entry["trigger"] == "user_request" and entry["reason"] == "wants a person"
    assert entry["waitingSince"] and any("#1234" in p["content"] for p in entry["preview"])
    handoff_note = await customer.wait_for("message-received", lambda d: d["message"]["role"] == "system")
    assert "support team" in handoff_note[0]["message"]["content"]

    claimed = await agent_call(agent, "claim", {"sessionId": session_id})
    assert claimed["ok"] and claimed["trigger"] == "user_request" and claimed["reason"] == "wants a person"
    assert any(m["content"] == "My order #1234 never arrived" for m in claimed["transcript"])
    assert claimed["summary"]
    joined = await customer.wait_for("agent-joined")
    assert joined[0]["agentName"] == "alex"
    await agent.wait_for("queue-updated", lambda d: d["queue"] == [])

    # customer -> agent, and the AI stays silent
    openai_calls = len(double.requests["openai"])
    sent = await customer.call("send-message", {"sessionId": session_id, "message": "Hi Alex, any news?"})
    assert sent["ok"]
    got = await agent.wait_for("message-received", lambda d: d["message"]["content"] == "Hi Alex, any news?")
    assert got[0]["message"]["role"] == "user"
    # agent -> customer
    reply = await agent_call(agent, "agent-message", {"sessionId": session_id, "message": "Yes, it ships today."})
    assert reply["ok"]
    received = await customer.wait_for("message-received", lambda d: d["message"]["role"] == "agent")
    assert received[0]["message"]["content"] == "Yes, it ships today." and received[0]["message"]["agentName"] == "alex"
    await asyncio.sleep(0.3)
    assert not any("Hi Alex" in str(r["body"]) for r in double.requests["openai"][openai_calls:])
    assert not [d for d in customer.of("message-received") if d["message"]["role"] == "assistant"][1:]

    # release: the AI answers again
    assert (await agent_call(agent, "release", {"sessionId": session_id}))["ok"]
    await customer.wait_for("agent-left")
    sent = await customer.call("send-message", {"sessionId": session_id, "message": "thanks"})
    back = await customer.reply_to(sent["messageId"])
    assert back["message"]["role"] == "assistant" and back["message"]["provider"] == "openai"

    _, history, _ = await http.get(f"{url}/api/v1/chat/history/{session_id}", token)
    roles = [m["role"] for m in history["messages"]]
    assert "agent" in roles and roles.count("user") == 3


async def test_two_agents_claiming_at_once_exactly_one_wins(handoff_server, connect, agents) -> None:
    alex = await agents(handoff_server.url, "alex-key-123-4567-89ab")
    sam = await agents(handoff_server.url, "sam-key-456-7890-cdef")
    customer, session_id, _ = await joined_client(connect, handoff_server.url)
    await customer.call("escalate", {"sessionId": session_id})
    await alex.wait_for("queue-updated", lambda d: len(d["queue"]) == 1)
    results = await asyncio.gather(
        agent_call(alex, "claim", {"sessionId": session_id}), agent_call(sam, "claim", {"sessionId": session_id})
    )
    assert sorted(r["ok"] for r in results) == [False, True]
    loser = next(r for r in results if not r["ok"])
    assert loser["error"]["code"] in ("validation_error", "not_found")
    assert len(await customer.wait_for("agent-joined")) == 1


async def test_agents_namespace_refuses_bad_keys_and_customers_cannot_use_agent_events(handoff_server, connect, http) -> None:
    for auth in (None, {}, {"key": "wrong"}, {"key": ""}):
        with pytest.raises(socketio.exceptions.ConnectionError):
            await connect(handoff_server.url, namespaces=["/agents"], auth=auth, wait_timeout=3)
    customer, session_id, token = await joined_client(connect, handoff_server.url)
    await customer.call("escalate", {"sessionId": session_id})
    for event in ("claim", "agent-message", "release", "close"):
        ack = await customer.call(event, {"sessionId": session_id, "message": "I am the agent now"})
        assert ack["ok"] is False and ack["error"]["code"] == "unauthorized"
    # a customer's session token is not an agent key
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(handoff_server.url, namespaces=["/agents"], auth={"key": token}, wait_timeout=3)
    r = await http.get(f"{handoff_server.url}/api/v1/tickets", token)
    assert r.status == 401


async def test_no_agent_online_asks_for_contact_and_creates_ticket(handoff_server, connect, http) -> None:
    customer, session_id, _ = await joined_client(connect, handoff_server.url)
    sent = await customer.call("send-message", {"sessionId": session_id, "message": "I need help with order 42"})
    await customer.reply_to(sent["messageId"])
    await customer.call("escalate", {"sessionId": session_id})
    await customer.wait_for("contact-requested")
    bad = await customer.call("provide-contact", {"sessionId": session_id, "email": "not-an-email"})
    assert bad["ok"] is False and bad["error"]["code"] == "validation_error" and "email" in bad["error"]["details"]
    ok = await customer.call("provide-contact", {"sessionId": session_id, "email": "jo@example.com"})
    assert ok["ok"] and ok["ticketId"]
    created = await customer.wait_for("ticket-created")
    assert created[0]["ticketId"] == ok["ticketId"]
    note = await customer.wait_for("message-received", lambda d: "jo@example.com" in d["message"]["content"])
    assert note[0]["message"]["role"] == "system"

    key = "alex-key-123-4567-89ab"
    _, listing, _ = await http.get(f"{handoff_server.url}/api/v1/tickets", key)
    assert [t["id"] for t in listing["tickets"]] == [ok["ticketId"]]
    _, ticket, _ = await http.get(f"{handoff_server.url}/api/v1/tickets/{ok['ticketId']}", key)
    assert ticket["contact"] == {"email": "jo@example.com"} and ticket["status"] == "open"
    assert ticket["summary"] and any(m["content"] == "I need help with order 42" for m in ticket["transcript"])
    assert ticket["trigger"] == "user_request"
    r = await http.post(f"{handoff_server.url}/api/v1/tickets/{ok['ticketId']}/resolve", {"resolution": "refunded"}, key)
    assert r.status == 200 and r.body["status"] == "resolved"
    r = await http.get(f"{handoff_server.url}/api/v1/tickets/T-NOPE", key)
    assert r.status == 404
    # the AI keeps helping meanwhile
    sent = await customer.call("send-message", {"sessionId": session_id, "message": "still there?"})
    assert (await customer.reply_to(sent["messageId"]))["message"]["role"] == "assistant"


@pytest.mark.slow  # waits out AGENT_WAIT_TIMEOUT
async def test_ticket_when_nobody_claims_in_time(start_server, connect, agents) -> None:
    server = await start_server(agent_api_keys=AGENT_KEYS, agent_wait_timeout=1.0)
    agent = await agents(server.url)
    customer, session_id, _ = await joined_client(connect, server.url)
    await customer.call("escalate", {"sessionId": session_id})
    await agent.wait_for("queue-updated", lambda d: len(d["queue"]) == 1)
    await customer.wait_for("contact-requested", timeout=5)
    await agent.wait_for("queue-updated", lambda d: d["queue"] == [], timeout=5)
    ok = await customer.call("provide-contact", {"sessionId": session_id, "email": "late@example.com"})
    assert ok["ok"]
    assert (await agent_call(agent, "claim", {"sessionId": session_id}))["ok"] is False


@pytest.mark.slow  # waits out AGENT_IDLE_TIMEOUT
async def test_idle_agent_hands_back_to_ai(start_server, connect, agents) -> None:
    server = await start_server(agent_api_keys=AGENT_KEYS, agent_idle_timeout=1.0)
    agent = await agents(server.url)
    customer, session_id, _ = await joined_client(connect, server.url)
    await customer.call("escalate", {"sessionId": session_id})
    await agent.wait_for("queue-updated", lambda d: len(d["queue"]) == 1)
    assert (await agent_call(agent, "claim", {"sessionId": session_id}))["ok"]
    left = await customer.wait_for("agent-left", timeout=5)
    assert left[0]["reason"] == "idle"
    sent = await customer.call("send-message", {"sessionId": session_id, "message": "hello?"})
    assert (await customer.reply_to(sent["messageId"]))["message"]["role"] == "assistant"


async def test_close_ends_the_conversation_with_a_resolution(handoff_server, connect, agents) -> None:
    agent = await agents(handoff_server.url)
    customer, session_id, _ = await joined_client(connect, handoff_server.url)
    await customer.call("escalate", {"sessionId": session_id})
    await agent.wait_for("queue-updated", lambda d: len(d["queue"]) == 1)
    await agent_call(agent, "claim", {"sessionId": session_id})
    assert (await agent_call(agent, "close", {"sessionId": session_id, "resolution": "Refund issued"}))["ok"]
    note = await customer.wait_for("message-received", lambda d: "Refund issued" in d["message"]["content"])
    assert note[0]["message"]["role"] == "system"
    again = await agent_call(agent, "agent-message", {"sessionId": session_id, "message": "one more thing"})
    assert again["ok"] is False and again["error"]["code"] == "unauthorized"


async def test_a_reconnecting_agent_is_back_in_the_conversations_it_holds(handoff_server, connect, agents) -> None:
    url = handoff_server.url
    agent = await agents(url)
    customer, session_id, _ = await joined_client(connect, url)
    assert (await customer.call("escalate", {"sessionId": session_id}))["ok"]
    await agent.wait_for("queue-updated", lambda d: any(e["sessionId"] == session_id for e in d["queue"]))
    assert (await agent_call(agent, "claim", {"sessionId": session_id}))["ok"]
    await agent.disconnect()  # a page reload, or the server it was connected to restarted

    again = await agents(url)
    await customer.call("send-message", {"sessionId": session_id, "message": "are you still there?"})
    seen = await again.wait_for("message-received", lambda d: d["message"]["content"] == "are you still there?")
    assert seen[0]["message"]["role"] == "user"
    reply = await agent_call(again, "agent-message", {"sessionId": session_id, "message": "Yes, still here."})
    assert reply["ok"]
