"""The visitor's language (issue 14): detected offline, kept with the session for agents, models told to answer in
it, and the offline assistant saying in it that it answers in English and a person can help."""

from __future__ import annotations

from typing import Any

from server.chat.translations import OFFLINE_NOTES
from tests.clients import joined_client
from tests.servers import AGENT_KEYS

SPANISH = "¿Cuánto tarda el envío estándar? Lo pedí hace dos semanas."


async def ask(client: Any, session_id: str, text: str) -> dict[str, Any]:
    sent = await client.call("send-message", {"sessionId": session_id, "message": text})
    assert sent["ok"], sent
    return await client.reply_to(sent["messageId"])


def system_prompt(double: Any) -> str:
    return str(double.requests["openai"][-1]["body"]["messages"][0]["content"])


async def test_a_model_is_told_to_answer_in_the_visitors_language(server, connect, double, redis_sync) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    await ask(client, session_id, "How long does standard shipping take?")
    assert "Answer in" not in system_prompt(double)
    await ask(client, session_id, SPANISH)
    assert system_prompt(double).endswith("The visitor writes in Spanish. Answer in Spanish.")
    assert redis_sync.hget(f"chat:session:{{{session_id}}}", "language") == b"es"
    await ask(client, session_id, "ok")  # too short to tell: the session keeps Spanish
    assert system_prompt(double).endswith("Answer in Spanish.")
    await ask(client, session_id, "Actually, can you tell me how long standard shipping takes to arrive?")
    assert "Answer in" not in system_prompt(double)  # clearly English again
    assert redis_sync.hget(f"chat:session:{{{session_id}}}", "language") == b"en"


async def test_offline_the_answer_starts_with_a_note_in_the_visitors_language(start_server, connect) -> None:
    server = await start_server(ai_providers=("local",))
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": SPANISH})
    reply = (await client.reply_to(sent["messageId"]))["message"]
    assert reply["provider"] == "local"
    assert reply["content"].startswith(OFFLINE_NOTES["es"] + "\n\n")
    streamed = "".join(c["delta"] for c in client.of("message-chunk") if c["messageId"] == reply["id"])
    assert not streamed or reply["content"].startswith(streamed[: len(OFFLINE_NOTES["es"])])
    english = await ask(client, session_id, "How long does standard shipping take exactly?")
    assert not english["message"]["content"].startswith(OFFLINE_NOTES["es"])


async def test_agents_see_the_visitors_language(start_server, connect, agents) -> None:
    server = await start_server(agent_api_keys=AGENT_KEYS)
    agent = await agents(server.url)
    client, session_id, _ = await joined_client(connect, server.url)
    await ask(client, session_id, "Wo ist meine Bestellung? Ich warte seit zwei Wochen darauf.")
    assert (await client.call("escalate", {"sessionId": session_id}))["ok"]
    queue = (await agent.call("get-queue"))["queue"]
    assert [entry["language"] for entry in queue if entry["sessionId"] == session_id] == ["de"]
    claimed = await agent.call("claim", {"sessionId": session_id})
    assert claimed["language"] == "de", claimed


async def test_with_no_languages_nothing_is_detected(start_server, connect, double, redis_sync) -> None:
    server = await start_server(languages=())
    client, session_id, _ = await joined_client(connect, server.url)
    await ask(client, session_id, SPANISH)
    assert "Answer in" not in system_prompt(double)
    assert redis_sync.hget(f"chat:session:{{{session_id}}}", "language") is None
