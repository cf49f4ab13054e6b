"""Arrival order is the order of storing and answering, whatever a handler awaits before the message is queued."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.clients import joined_client

pytestmark = pytest.mark.slow  # bursts timed to show any reordering

BURST = 20  # five were not always enough to show a reordering; twenty always were (measured on the old code)


async def test_unawaited_emits_on_one_socket_are_stored_and_answered_in_arrival_order(
    server, connect, double, redis_sync
) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    for burst in range(3):
        # The first message's answer is the slowest: nothing may overtake it.
        double.set_mode("openai", "ok", delays=[0.01 * (BURST - n) for n in range(BURST)])
        acks: list[asyncio.Future] = [asyncio.get_running_loop().create_future() for _ in range(BURST)]
        for n in range(BURST):
            await client.client.emit(
                "send-message",
                {"sessionId": session_id, "message": f"burst {burst} message {n}"},
                callback=lambda ack, f=acks[n]: f.set_result(ack),
            )
        answers = await asyncio.wait_for(asyncio.gather(*acks), 20)
        assert all(a["ok"] for a in answers), answers
        for ack in answers:
            await client.reply_to(ack["messageId"])
    stored = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session_id}}}", 0, -1)]
    expected = [f"burst {b} message {n}" for b in range(3) for n in range(BURST)]
    assert [m["content"] for m in stored if m["role"] == "user"] == expected
    assert [m["role"] for m in stored] == ["user", "assistant"] * (3 * BURST)
    for question, answer in zip(stored[::2], stored[1::2], strict=True):
        assert answer["replyTo"] == question["id"] and answer["content"] == f"Echo: {question['content']}"
    replies = [d["message"]["content"] for d in client.of("message-received") if d["message"]["role"] == "assistant"]
    assert replies == [f"Echo: {text}" for text in expected]


async def test_rest_messages_are_answered_in_the_order_they_arrive(server, double, redis_sync, http) -> None:
    _, session, _ = await http.post(f"{server.url}/api/v1/chat/session", {"userId": "rest-order"})
    double.set_mode("openai", "ok", delays=[0.3, 0.2, 0.1, 0.0])

    async def send(n: int) -> dict:
        body = {"sessionId": session["sessionId"], "message": f"rest {n}"}
        response = await http.post(f"{server.url}/api/v1/chat/message", body, session["token"])
        assert response.status == 200
        return response.body

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(send(n)))
        await asyncio.sleep(0.02)  # each request reaches the server before the next one is sent
    results = await asyncio.gather(*tasks)
    assert [r["reply"]["content"] for r in results] == [f"Echo: rest {n}" for n in range(4)]
    stored = [orjson.loads(m) for m in redis_sync.lrange(f"chat:history:{{{session['sessionId']}}}", 0, -1)]
    assert [m["content"] for m in stored if m["role"] == "user"] == [f"rest {n}" for n in range(4)]
