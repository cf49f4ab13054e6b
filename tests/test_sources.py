"""Sources: the knowledge-base entries an answer used travel on the message, everywhere a message goes.

The offline provider lists the entry it answered with. A model is shown the retrieved entries numbered in its system
prompt and cites them as `[n]`; the server turns the citations into sources and never lists an entry the prompt did
not show: such a citation is dropped from the text and counted.
"""

from __future__ import annotations

import re

import pytest

from devtools.provider_double import ProviderDouble
from server.ai.knowledge import KnowledgeBase, KnowledgeEntry
from server.settings import Settings
from tests.clients import Http, agent_call, joined_client, parse_sse
from tests.servers import AGENT_KEYS, RunningServer

QUESTION = "How do I return an item?"
# A line of the system prompt listing a retrieved entry: `[2] Q: How do I return an item?` (or without the `Q:`).
_LISTED = re.compile(r"^\[(\d+)\]\s*(?:Q:\s*)?(.+?)\s*$", re.MULTILINE)


@pytest.fixture
def knowledge(settings: Settings) -> dict[str, KnowledgeEntry]:
    """The shipped knowledge base's entries by title (an entry's title is its question)."""
    entries = KnowledgeBase.from_directory(settings.knowledge_dir, store_name=settings.store_name).entries
    return {entry.question: entry for entry in entries}


def source(entry: KnowledgeEntry) -> dict[str, str]:
    """An entry as the message lists it."""
    return {"id": entry.id, "title": entry.question}


def listed_in_prompt(double: ProviderDouble, knowledge: dict[str, KnowledgeEntry]) -> dict[int, KnowledgeEntry]:
    """The entries the last OpenAI request's system prompt listed, by their number."""
    system = double.requests["openai"][-1]["body"]["messages"][0]["content"]
    return {int(n): knowledge[title] for n, title in _LISTED.findall(system) if title in knowledge}


async def metric(http: Http, server: RunningServer, line_start: str) -> float:
    """A sample of the Prometheus exposition (0 when absent)."""
    _, text = await http.get_text(f"{server.url}/metrics")
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_local_answer_carries_its_entry_on_socket_history_rejoin_and_agent_views(
    start_server, connect, agents, http: Http, knowledge
) -> None:
    server = await start_server(ai_providers=("local",), agent_api_keys=AGENT_KEYS, agent_wait_timeout=30.0)
    client, session_id, token = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": QUESTION})
    reply = (await client.reply_to(sent["messageId"]))["message"]
    entry = knowledge[QUESTION]
    assert reply["provider"] == "local"
    assert reply["sources"] == [source(entry)]
    assert reply["content"].startswith(entry.answer[:60])

    greeted = await client.call("send-message", {"sessionId": session_id, "message": "Hello!"})
    greeting = (await client.reply_to(greeted["messageId"]))["message"]
    assert greeting["role"] == "assistant" and greeting["sources"] == []  # no entry used: an empty list

    _, history, _ = await http.get(f"{server.url}/api/v1/chat/history/{session_id}", token)
    stored = {m["id"]: m for m in history["messages"]}
    assert stored[reply["id"]]["sources"] == [source(entry)]
    assert stored[greeting["id"]]["sources"] == []
    assert all("sources" not in m for m in history["messages"] if m["role"] != "assistant")

    again = await connect(server.url)
    assert (await again.call("join-chat", {"sessionId": session_id, "token": token}))["ok"]
    joined = (await again.wait_for("chat-joined"))[0]
    assert {m["id"]: m.get("sources") for m in joined["history"] if m["role"] == "assistant"} == {
        reply["id"]: [source(entry)],
        greeting["id"]: [],
    }

    agent = await agents(server.url)
    assert (await client.call("escalate", {"sessionId": session_id, "reason": "wants a person"}))["ok"]
    claimed = await agent_call(agent, "claim", {"sessionId": session_id})
    assert claimed["ok"]
    answers = {m["id"]: m for m in claimed["transcript"]}
    assert answers[reply["id"]]["sources"] == [source(entry)]
    said = await agent_call(agent, "agent-message", {"sessionId": session_id, "message": "Hi, Alex here."})
    assert said["ok"]
    received = await client.wait_for("message-received", lambda d: d["message"]["role"] == "agent")
    assert "sources" not in received[0]["message"]
    notes = [d["message"] for d in client.of("message-received") if d["message"]["role"] == "system"]
    assert notes and all("sources" not in note for note in notes)


async def test_the_local_answer_carries_its_entry_over_rest_sse_and_in_the_export(start_server, http: Http, knowledge) -> None:
    server = await start_server(ai_providers=("local",))
    session = await http.new_session(server.url, "rest-visitor")
    status, body, _ = await http.post(
        f"{server.url}/api/v1/chat/message", {"sessionId": session["sessionId"], "message": QUESTION}, session["token"]
    )
    assert status == 200, body
    assert body["reply"]["sources"] == [source(knowledge[QUESTION])]
    assert "sources" not in body["userMessage"]

    response = await http.post(
        f"{server.url}/api/v1/chat/message/stream", {"sessionId": session["sessionId"], "message": QUESTION}, session["token"]
    )
    events = parse_sse(response.body)
    done = [data for name, data in events if name == "done"]
    assert len(done) == 1 and done[0]["reply"]["sources"] == [source(knowledge[QUESTION])]
    assert all("sources" not in data.get("userMessage", {}) for _, data in events)

    _, exported, _ = await http.get(f"{server.url}/api/v1/chat/session/{session['sessionId']}/export", session["token"])
    answers = [m for m in exported["messages"] if m["role"] == "assistant"]
    assert [m["sources"] for m in answers] == [[source(knowledge[QUESTION])]] * 2


async def test_a_models_citations_become_the_sources_and_one_it_was_not_shown_is_dropped_and_counted(
    server: RunningServer, double: ProviderDouble, connect, http: Http, knowledge
) -> None:
    double.set_mode(
        "openai",
        "ok",
        reply="Start the return under Orders [2]. Refunds follow [1, 2]. Gift cards never expire [9].",
    )
    client, session_id, token = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": QUESTION})
    reply = (await client.reply_to(sent["messageId"]))["message"]
    listed = listed_in_prompt(double, knowledge)
    assert len(listed) >= 2 and 9 not in listed, listed
    assert reply["provider"] == "openai"
    # In order of first citation, renumbered so that [n] is sources[n - 1]; [9] was never in the prompt.
    assert reply["sources"] == [source(listed[2]), source(listed[1])]
    assert reply["content"] == "Start the return under Orders [1]. Refunds follow [2][1]. Gift cards never expire."
    assert await metric(http, server, 'support_citations_dropped_total{provider="openai"}') == 1

    _, history, _ = await http.get(f"{server.url}/api/v1/chat/history/{session_id}", token)
    stored = next(m for m in history["messages"] if m["id"] == reply["id"])
    assert stored["sources"] == reply["sources"] and stored["content"] == reply["content"]


async def test_a_model_answer_with_no_citation_has_no_sources(server: RunningServer, double: ProviderDouble, http: Http) -> None:
    double.set_mode("openai", "ok", reply="Happy to help with that.")
    session = await http.new_session(server.url, "no-citations")
    status, body, _ = await http.post(
        f"{server.url}/api/v1/chat/message", {"sessionId": session["sessionId"], "message": QUESTION}, session["token"]
    )
    assert status == 200, body
    assert body["reply"]["provider"] == "openai" and body["reply"]["sources"] == []
    assert body["reply"]["content"] == "Happy to help with that."
    assert await metric(http, server, "support_citations_dropped_total") == 0


async def test_the_prompt_numbers_the_retrieved_entries_and_asks_for_citations(
    server: RunningServer, double: ProviderDouble, http: Http, knowledge
) -> None:
    session = await http.new_session(server.url, "prompt")
    await http.post(
        f"{server.url}/api/v1/chat/message", {"sessionId": session["sessionId"], "message": QUESTION}, session["token"]
    )
    listed = listed_in_prompt(double, knowledge)
    assert listed.get(1) == knowledge[QUESTION]  # the best entry first
    assert sorted(listed) == list(range(1, len(listed) + 1))
    system: str = double.requests["openai"][-1]["body"]["messages"][0]["content"]
    assert "cite" in system.lower()


async def test_openapi_documents_sources_on_messages(server: RunningServer, http: Http) -> None:
    _, spec, _ = await http.get(f"{server.url}/api/v1/openapi.json")
    schemas = spec["components"]["schemas"]
    assert schemas["Message"]["properties"]["sources"]["type"] == "array"
    assert set(schemas["Source"]["required"]) == {"id", "title"}
