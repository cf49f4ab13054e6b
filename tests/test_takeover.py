"""A reply whose owner stopped renewing its lease is finished by another process (here: in-process servers)."""

from __future__ import annotations

import asyncio
import json
import time

import orjson
import pytest

from server.app_keys import STORAGE
from server.contract import new_id, now_iso
from server.storage.messages import ReplyLease

pytestmark = pytest.mark.slow  # leases that must expire


async def orphaned_message(server, redis_sync, text: str, *, attempt: int = 1) -> tuple[str, str, str]:
    """A stored user message whose reply was leased to a process that died: (sessionId, messageId, replyId)."""
    storage = server.app[STORAGE]
    session, _ = await storage.sessions.create("orphan", {})
    message = {"id": new_id(), "sessionId": session.id, "role": "user", "content": text, "createdAt": now_iso()}
    reply_id = new_id()
    await storage.messages.append(session.id, message, lease=ReplyLease("a-dead-process", reply_id, 0.2))
    if attempt > 1:
        key = f"chat:pending:{{{session.id}}}"
        pending = json.loads(redis_sync.get(key))
        redis_sync.set(key, json.dumps({**pending, "attempt": attempt}), keepttl=True)
    return session.id, message["id"], reply_id


async def answers_to(redis_sync, session_id: str, message_id: str, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
        found = [m for m in history if m.get("replyTo") == message_id]
        if found:
            await asyncio.sleep(0.2)  # a failure note may follow its reply
            history = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
            return [m for m in history if m.get("replyTo") == message_id]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer to {message_id} within {timeout} s")


async def test_an_orphaned_reply_is_written_again_under_its_own_id(server, redis_sync) -> None:
    session_id, message_id, reply_id = await orphaned_message(server, redis_sync, "anyone there?")
    answers = await answers_to(redis_sync, session_id, message_id)
    assert [(m["role"], m["id"], m["content"]) for m in answers] == [("assistant", reply_id, "Echo: anyone there?")]
    assert redis_sync.get(f"chat:pending:{{{session_id}}}") is None
    assert redis_sync.zscore("chat:replyleases", session_id) is None


async def test_a_reply_that_already_failed_once_is_marked_with_an_error_escalation(server, redis_sync) -> None:
    session_id, message_id, _ = await orphaned_message(server, redis_sync, "and again?", attempt=2)
    answers = await answers_to(redis_sync, session_id, message_id)
    assert [m["role"] for m in answers] == ["system"]
    escalations = [orjson.loads(e) for e in redis_sync.lrange(f"chat:escalations:{{{session_id}}}", 0, -1)]
    assert [e["trigger"] for e in escalations] == ["error"]
    assert redis_sync.zscore("chat:replyleases", session_id) is None


async def test_a_live_owner_keeps_its_lease_through_a_slow_reply(start_server, connect, double, redis_sync) -> None:
    from tests.clients import joined_client

    first = await start_server()
    await start_server()  # a second process that would take over an expired lease
    double.set_mode("openai", "ok", tokens=70, chunk_delay=0.1)  # 7 s: longer than one lease
    client, session_id, _ = await joined_client(connect, first.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "take your time"})
    reply = await client.reply_to(sent["messageId"], timeout=20)
    assert reply["message"]["content"].split() == [f"tok{i}" for i in range(70)]
    history = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
    assert [m["role"] for m in history] == ["user", "assistant"]  # nobody answered it a second time


async def test_the_next_message_answers_an_unfinished_reply_first(server, connect, redis_sync) -> None:
    from tests.clients import joined_client

    client, session_id, _ = await joined_client(connect, server.url)
    storage = server.app[STORAGE]
    first = {"id": new_id(), "sessionId": session_id, "role": "user", "content": "first", "createdAt": now_iso()}
    # Its process died just now: the lease has not even expired when the visitor writes again.
    await storage.messages.append(session_id, first, lease=ReplyLease("a-dead-process", new_id(), 60))
    sent = await client.call("send-message", {"sessionId": session_id, "message": "second"})
    assert (await client.reply_to(sent["messageId"]))["message"]["content"] == "Echo: second"
    history = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
    answers = {m["replyTo"]: m["content"] for m in history if m["role"] == "assistant"}
    assert answers == {first["id"]: "Echo: first", sent["messageId"]: "Echo: second"}
    replies = [d["message"]["replyTo"] for d in client.of("message-received") if d["message"]["role"] == "assistant"]
    assert replies == [first["id"], sent["messageId"]]  # the older message is answered first
    assert redis_sync.get(f"chat:pending:{{{session_id}}}") is None
