"""Issue 11, items 7-9: bounded queues, limited events, one ticket per session, capped history, ticket paging."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
import psutil
import pytest
import redis

from devtools.provider_double import ProviderDouble
from server.app_keys import CHAT_SERVICE, CUSTOMER_EVENTS, HANDOFF, STORAGE
from server.settings import parse_agent_keys
from tests.clients import Http, joined_client
from tests.servers import ServerFactory

pytestmark = pytest.mark.slow  # floods and queue limits

AGENT_KEY = "kQ7vN2xLp9RwT4zHc8JmB3sYfD6g"
AGENT_KEYS = (("alex", AGENT_KEY),)
NOBODY_FREE = "Nobody from our team is free right now"


def _agent_keys() -> Any:
    return parse_agent_keys(",".join(f"{name}:{key}" for name, key in AGENT_KEYS))


async def _wait_until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _history(redis_sync: redis.Redis, session_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]


async def _rest_session(http: Http, url: str) -> tuple[str, str]:
    _, body, _ = await http.post(f"{url}/api/v1/chat/session", {"userId": "rest-user"})
    return body["sessionId"], body["token"]


# Item 7: per-session and per-client queues ------------------------------------------------------------------
async def test_a_session_queue_is_bounded(start_server: ServerFactory, connect: Any, double: ProviderDouble) -> None:
    double.set_mode("both", "ok", delay=0.3)
    server = await start_server(max_pending_per_session=3, max_pending_per_client=0)
    client, session_id, _ = await joined_client(connect, server.url)
    acks = await asyncio.gather(
        *(client.call("send-message", {"sessionId": session_id, "message": f"m{i}"}, timeout=20) for i in range(12))
    )
    refused = [a for a in acks if not a["ok"]]
    assert len([a for a in acks if a["ok"]]) <= 4  # the one being answered and 3 waiting
    assert len(refused) >= 8
    assert all(a["error"]["code"] == "rate_limited" and a["retryAfter"] > 0 for a in refused)
    assert "waiting in this conversation" in refused[0]["error"]["message"]


async def test_a_client_cannot_queue_more_than_its_share(
    start_server: ServerFactory, connect: Any, double: ProviderDouble
) -> None:
    double.set_mode("both", "ok", delay=0.3)
    server = await start_server(max_pending_per_session=0, max_pending_per_client=4)
    client, first, _ = await joined_client(connect, server.url)
    second = (await client.call("join-chat", {"userId": "u1"}))["sessionId"]
    sends = [
        client.call("send-message", {"sessionId": session_id, "message": f"m{i}"}, timeout=20)
        for i in range(6)
        for session_id in (first, second)
    ]
    acks = await asyncio.gather(*sends)
    refused = [a for a in acks if not a["ok"]]
    assert len(refused) >= 6
    assert all(a["error"]["code"] == "rate_limited" and a["retryAfter"] > 0 for a in refused)
    assert "your messages" in refused[0]["error"]["message"]
    # the counter comes back down: once the queue drained, the client may send again
    ok = await client.call("send-message", {"sessionId": first, "message": "later"}, timeout=20)
    assert ok["ok"], ok


async def test_queued_messages_nobody_can_receive_are_dropped(
    start_server: ServerFactory, connect: Any, double: ProviderDouble, redis_sync: redis.Redis
) -> None:
    double.set_mode("both", "ok", delay=0.5)
    server = await start_server(max_pending_per_session=50)
    chat = server.app[CHAT_SERVICE]
    client, session_id, _ = await joined_client(connect, server.url)
    for i in range(10):
        await client.emit("send-message", {"sessionId": session_id, "message": f"unawaited {i}"})
    await _wait_until(lambda: chat.busy_sessions == 1)
    await asyncio.sleep(0.1)  # the first message is being answered, the others wait
    await client.disconnect()
    await _wait_until(lambda: chat.busy_sessions == 0)
    users = [m for m in _history(redis_sync, session_id) if m["role"] == "user"]
    assert len(users) <= 2, [m["content"] for m in users]
    assert len(double.requests["openai"]) + len(double.requests["gemini"]) <= 2


async def test_queued_messages_are_kept_while_another_socket_listens(
    start_server: ServerFactory, connect: Any, double: ProviderDouble, redis_sync: redis.Redis
) -> None:
    double.set_mode("both", "ok", delay=0.2)
    server = await start_server(max_pending_per_session=50)
    chat = server.app[CHAT_SERVICE]
    sender, session_id, token = await joined_client(connect, server.url)
    watcher = await connect(server.url)
    assert (await watcher.call("join-chat", {"sessionId": session_id, "token": token}))["ok"]
    for i in range(5):
        await sender.emit("send-message", {"sessionId": session_id, "message": f"kept {i}"})
    await _wait_until(lambda: chat.busy_sessions == 1)
    await sender.disconnect()
    await _wait_until(lambda: chat.busy_sessions == 0)
    assert [m["content"] for m in _history(redis_sync, session_id) if m["role"] == "user"] == [f"kept {i}" for i in range(5)]
    await watcher.wait_for("message-received", lambda d: d["message"]["role"] == "assistant", count=5)


async def test_unawaited_flood_memory_comes_back(start_server: ServerFactory, connect: Any, double: ProviderDouble) -> None:
    """Load: 10 sessions x 200 unawaited messages, then the clients leave; RSS returns within 40 MB."""
    double.set_mode("both", "ok", delay=0.2)
    server = await start_server(rate_limit_messages_per_minute=0)
    chat = server.app[CHAT_SERVICE]
    process = psutil.Process(os.getpid())
    clients = [await joined_client(connect, server.url, f"flood{i}") for i in range(10)]
    before = process.memory_info().rss
    big = "x" * 3000
    for client, session_id, _ in clients:
        for _ in range(200):
            await client.emit("send-message", {"sessionId": session_id, "message": big})
    await asyncio.sleep(0.5)
    queued = chat.waiting
    assert queued <= 10 * 20  # MAX_PENDING_PER_SESSION's default
    for client, _, _ in clients:
        await client.disconnect()
    customers = server.app[CUSTOMER_EVENTS]
    await _wait_until(lambda: customers.connected == 0)  # the server saw every client leave
    calls_when_left = len(double.requests["openai"]) + len(double.requests["gemini"])
    await _wait_until(lambda: chat.busy_sessions == 0, timeout=15)
    after = process.memory_info().rss
    assert after - before < 40 * 1024 * 1024, (before, after)
    # after the clients left, at most the reply being written per session (and one racing the disconnect)
    assert len(double.requests["openai"]) + len(double.requests["gemini"]) - calls_when_left <= 2 * len(clients)


# Item 8: events, escalation, tickets, history -----------------------------------------------------------------
async def test_every_client_event_is_rate_limited(start_server: ServerFactory, connect: Any) -> None:
    server = await start_server(rate_limit_events_per_minute=5)
    client, session_id, _ = await joined_client(connect, server.url)
    acks = [await client.call("stop-generation", {"sessionId": session_id}) for _ in range(8)]
    assert [a["ok"] for a in acks] == [True] * 5 + [False] * 3
    assert acks[-1]["error"]["code"] == "rate_limited" and acks[-1]["retryAfter"] > 0
    for event, payload in (
        ("escalate", {"sessionId": session_id}),
        ("provide-contact", {"sessionId": session_id, "email": "a@example.com"}),
        ("feedback", {"sessionId": session_id, "messageId": "x", "rating": "up"}),
    ):
        ack = await client.call(event, payload)
        assert not ack["ok"] and ack["error"]["code"] == "rate_limited", (event, ack)


async def test_escalate_is_idempotent_and_opens_one_ticket(
    start_server: ServerFactory, connect: Any, redis_sync: redis.Redis
) -> None:
    server = await start_server(rate_limit_events_per_minute=1000, agent_api_keys=_agent_keys())
    client, session_id, _ = await joined_client(connect, server.url)
    acks = await asyncio.gather(*(client.call("escalate", {"sessionId": session_id}) for _ in range(60)))
    assert all(a["ok"] for a in acks)
    await client.wait_for("contact-requested")
    contacts = await asyncio.gather(
        *(client.call("provide-contact", {"sessionId": session_id, "email": "jo@example.com"}) for _ in range(20))
    )
    assert len({a["ticketId"] for a in contacts}) == 1
    await asyncio.sleep(0.3)
    notes = [m["content"] for m in _history(redis_sync, session_id) if m["role"] == "system"]
    assert sum(NOBODY_FREE in n for n in notes) == 1, notes
    assert sum("jo@example.com" in n for n in notes) == 1, notes
    assert len(client.of("contact-requested")) == 1
    assert redis_sync.llen(f"chat:escalations:{{{session_id}}}") == 1
    assert redis_sync.scard(f"chat:sessiontickets:{{{session_id}}}") == 1
    later = await client.call("escalate", {"sessionId": session_id})
    assert later == {"ok": True, "state": "ticket"}


async def test_one_ticket_per_session_under_a_race(start_server: ServerFactory, connect: Any, double: ProviderDouble) -> None:
    server = await start_server()
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "where is my parcel"})
    await client.reply_to(sent["messageId"])
    double.set_mode("both", "ok", delay=0.3)  # each ticket's summary takes a while: the window of the race
    handoff = server.app[HANDOFF]
    tickets = await asyncio.gather(*(handoff.tickets.open(session_id, "user_request", "race") for _ in range(20)))
    assert len({t["id"] for t in tickets}) == 1
    assert len(await server.app[STORAGE].tickets.session_ticket_ids(session_id)) == 1
    # once it is resolved, a new escalation may open a new one
    await handoff.tickets.resolve(tickets[0]["id"], "alex", "done")
    again = await handoff.tickets.open(session_id, "user_request", "again")
    assert again["id"] != tickets[0]["id"]


async def test_tickets_per_client_are_limited(start_server: ServerFactory, connect: Any, http: Http) -> None:
    server = await start_server(tickets_per_client_per_hour=2, agent_api_keys=_agent_keys())
    client, first, _ = await joined_client(connect, server.url)
    sessions = [first] + [(await client.call("join-chat", {"userId": "u1"}))["sessionId"] for _ in range(2)]
    for session_id in sessions:
        assert (await client.call("escalate", {"sessionId": session_id}))["ok"]
    await client.wait_for("contact-requested", count=2)
    refused = await client.call("provide-contact", {"sessionId": sessions[2], "email": "x@example.com"})
    assert not refused["ok"] and refused["error"]["code"] == "rate_limited"
    _, listing, _ = await http.get(f"{server.url}/api/v1/tickets", AGENT_KEY)
    assert sorted(t["sessionId"] for t in listing["tickets"]) == sorted(sessions[:2])


async def test_history_is_capped_and_pages_stay_right(
    start_server: ServerFactory, redis_sync: redis.Redis, double: ProviderDouble, http: Http
) -> None:
    server = await start_server(max_history_per_session=9, rate_limit_messages_per_minute=0)
    session_id, token = await _rest_session(http, server.url)
    replies = []
    for i in range(12):
        body = {"sessionId": session_id, "message": f"question {i}", "clientMessageId": f"c{i}"}
        response = await http.post(f"{server.url}/api/v1/chat/message", body, token)
        assert response.status == 200
        replies.append(response.body["reply"])
    stored = _history(redis_sync, session_id)
    assert len(stored) == 9 and stored[-1]["id"] == replies[-1]["id"]
    assert redis_sync.hlen(f"chat:msgindex:{{{session_id}}}") == 9
    assert redis_sync.hlen(f"chat:clientids:{{{session_id}}}") <= 5
    # the model still got the messages just before the new one
    assert "question 10" in orjson.dumps(double.requests["openai"][-1]["body"]).decode()
    # paging back with `before` walks exactly the kept messages, in order
    seen: list[dict[str, Any]] = []
    before = None
    while True:
        query = f"?limit=4{'&before=' + before if before else ''}"
        _, page, _ = await http.get(f"{server.url}/api/v1/chat/history/{session_id}{query}", token)
        seen = page["messages"] + seen
        if not page["hasMore"]:
            break
        before = page["messages"][0]["id"]
    assert [m["id"] for m in seen] == [m["id"] for m in stored]
    response = await http.get(f"{server.url}/api/v1/chat/history/{session_id}?before={replies[0]['id']}", token)
    assert response.status == 400  # a trimmed message is no longer known
    # a retried clientMessageId still kept answers with the first message; a reply still kept takes feedback
    body = {"sessionId": session_id, "message": "question 11", "clientMessageId": "c11"}
    _, again, _ = await http.post(f"{server.url}/api/v1/chat/message", body, token)
    assert again["reply"]["id"] == replies[-1]["id"]
    feedback = {"sessionId": session_id, "messageId": replies[-1]["id"], "rating": "up"}
    response = await http.post(f"{server.url}/api/v1/chat/feedback", feedback, token)
    assert response.status in (200, 204), response.body
    assert len(_history(redis_sync, session_id)) == 9


# Item 9: ticket listing -------------------------------------------------------------------------------------
async def test_a_ticket_flood_does_not_hide_real_tickets(start_server: ServerFactory, connect: Any, http: Http) -> None:
    server = await start_server(agent_api_keys=_agent_keys())
    tickets = server.app[STORAGE].tickets
    handoff = server.app[HANDOFF]
    _, real_session, _ = await joined_client(connect, server.url)
    real = await handoff.tickets.open(real_session, "user_request", "a real customer")
    await handoff.tickets.resolve(real["id"], "alex", "refunded")
    for i in range(110):
        await tickets.save(
            {"id": f"T-SPAM{i:04d}", "sessionId": f"spam-{i}", "status": "open", "createdAt": "", "transcript": []}
        )
    _, resolved, _ = await http.get(f"{server.url}/api/v1/tickets?status=resolved", AGENT_KEY)
    assert [t["id"] for t in resolved["tickets"]] == [real["id"]]
    assert resolved["nextCursor"] is None
    ids: list[str] = []
    cursor = None
    while True:
        query = "?limit=40" + (f"&cursor={cursor}" if cursor else "")
        response = await http.get(f"{server.url}/api/v1/tickets{query}", AGENT_KEY)
        assert response.status == 200
        page = response.body
        assert len(page["tickets"]) <= 40
        ids += [t["id"] for t in page["tickets"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert len(ids) == 111 and len(set(ids)) == 111 and ids[-1] == real["id"]
    response = await http.get(f"{server.url}/api/v1/tickets?cursor=garbage!", AGENT_KEY)
    assert response.status == 400
    response = await http.get(f"{server.url}/api/v1/tickets?limit=0", AGENT_KEY)
    assert response.status == 400


@pytest.fixture(autouse=True)
def _quiet_double(double: ProviderDouble) -> None:
    double.reset()


async def test_a_crafted_ticket_cursor_is_a_validation_error(start_server, http: Http) -> None:
    """A cursor holding a non-finite score (Redis refuses nan) answers 400, never 500."""
    import base64

    server = await start_server(agent_api_keys=_agent_keys())
    for score in ("nan", "inf", "-inf"):
        raw = orjson.dumps({"id": "T-NOPE", "s": score})
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        response = await http.get(f"{server.url}/api/v1/tickets?cursor={cursor}", AGENT_KEY)
        assert response.status == 400, (score, response.status, response.body)
