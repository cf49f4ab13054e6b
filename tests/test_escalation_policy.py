"""Escalation a support lead would sign off (issue 14), against a real server, Redis and Socket.IO clients:
off-topic never escalates, `low_confidence` waits for the second miss in a row, "refund" is answered, asking for a
person or a severe word escalates at once, an upset visitor is offered a person (`sentiment`), and every trigger is
counted in the analytics and the metrics."""

from __future__ import annotations

from typing import Any

from server.settings import Secret
from tests.clients import joined_client, request
from tests.servers import AGENT_KEYS

KEY = "alex-key-123-4567-89ab"
IN_SCOPE = ("How long does standard shipping take?", "how many days until my parcel arrives with normal delivery?")


async def ask(client: Any, session_id: str, text: str) -> dict[str, Any]:
    sent = await client.call("send-message", {"sessionId": session_id, "message": text})
    assert sent["ok"], sent
    return await client.reply_to(sent["messageId"])


async def tickets(url: str) -> list[dict[str, Any]]:
    reply = await request("GET", f"{url}/api/v1/tickets", None, KEY)
    assert reply.status == 200, reply
    return list(reply.body["tickets"])


async def escalations_today(url: str) -> dict[str, int]:
    reply = await request("GET", f"{url}/api/v1/analytics", None, KEY)
    assert reply.status == 200, reply
    return dict(reply.body["days"][-1]["escalations"])


async def test_the_first_miss_is_not_escalated_the_second_in_a_row_is(start_server, connect, double) -> None:
    server = await start_server(agent_api_keys=AGENT_KEYS)
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "low_logprobs")
    first = await ask(client, session_id, IN_SCOPE[0])
    assert first["message"]["confidence"] < 0.5 and first["escalation"] is None
    assert client.of("escalation-needed") == []
    second = await ask(client, session_id, IN_SCOPE[1])  # the visitor rephrased: still no good answer
    escalation = second["escalation"]
    assert escalation["trigger"] == "low_confidence"
    assert escalation["reason"].startswith("Second answer in a row below 0.50")
    assert (await client.wait_for("escalation-needed"))[0] == escalation  # never silent
    assert (await escalations_today(server.url)).get("low_confidence") == 1


async def test_an_answered_question_between_two_misses_starts_the_count_over(server, connect, double) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "low_logprobs")
    assert (await ask(client, session_id, IN_SCOPE[0]))["escalation"] is None
    double.set_mode("openai", "ok")
    answered = await ask(client, session_id, "Which payment methods do you accept?")
    assert answered["message"]["confidence"] >= 0.5 and answered["escalation"] is None
    double.set_mode("openai", "low_logprobs")
    assert (await ask(client, session_id, IN_SCOPE[1]))["escalation"] is None  # a first miss again
    assert (await ask(client, session_id, IN_SCOPE[0]))["escalation"]["trigger"] == "low_confidence"


async def test_one_miss_in_a_row_is_the_old_policy(start_server, connect, double) -> None:
    server = await start_server(escalation_misses_in_a_row=1)
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "low_logprobs")
    received = await ask(client, session_id, IN_SCOPE[0])
    assert received["escalation"]["trigger"] == "low_confidence"
    assert received["escalation"]["reason"] == "The answer's confidence 0.05 is below 0.50."


async def test_the_miss_count_lives_with_the_session_across_servers(start_server, connect, double) -> None:
    """Two processes on one Redis: the first miss on one, the second on the other, still the second in a row."""
    one, two = await start_server(), await start_server()
    client, session_id, token = await joined_client(connect, one.url)
    double.set_mode("openai", "low_logprobs")
    assert (await ask(client, session_id, IN_SCOPE[0]))["escalation"] is None
    other = await connect(two.url)
    joined = await other.call("join-chat", {"sessionId": session_id, "token": token})
    assert joined["ok"], joined
    assert (await ask(other, session_id, IN_SCOPE[1]))["escalation"]["trigger"] == "low_confidence"


async def test_off_topic_never_escalates_even_with_low_logprobs(start_server, connect, double) -> None:
    server = await start_server(agent_api_keys=AGENT_KEYS)
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "low_logprobs")
    for text in ("What is the capital of France?", "Who won the World Cup in 2018?", "What is the capital of France?"):
        received = await ask(client, session_id, text)
        assert received["message"]["confidence"] < 0.5 and received["escalation"] is None, text
    assert client.of("escalation-needed") == [] and client.of("contact-requested") == []
    assert await tickets(server.url) == []
    # and an off-topic message does not break a run of misses either way: it is not counted
    assert (await ask(client, session_id, IN_SCOPE[0]))["escalation"] is None


async def test_off_topic_with_the_offline_assistant_gets_a_scope_answer_and_no_ticket(start_server, connect) -> None:
    server = await start_server(ai_providers=("local",), agent_api_keys=AGENT_KEYS)
    client, session_id, _ = await joined_client(connect, server.url)
    for text in ("What is the capital of France?", "Tell me a joke about penguins", "What is the capital of France?"):
        received = await ask(client, session_id, text)
        assert received["message"]["provider"] == "local" and received["escalation"] is None, received
    assert client.of("escalation-needed") == []
    assert await tickets(server.url) == []


async def test_refund_alone_is_answered_not_escalated(start_server, connect) -> None:
    server = await start_server(ai_providers=("local",))
    client, session_id, _ = await joined_client(connect, server.url)
    for text in ("I want a refund", "How long does a refund take?", "This is urgent: where is my return label?"):
        received = await ask(client, session_id, text)
        assert received["escalation"] is None, (text, received)
    assert client.of("escalation-needed") == []


async def test_asking_for_a_person_or_a_severe_word_escalates_at_once(server, connect) -> None:
    cases = [
        ("Can I talk to a real person please?", "The visitor asks for a person (“real person”)."),
        ("I want a human", "The visitor asks for a person (“human”)."),
        ("I will file a chargeback with my bank", "The message mentions “chargeback”."),
        ("This is fraud, I never placed this order", "The message mentions “fraud”."),
    ]
    for text, reason in cases:
        client, session_id, _ = await joined_client(connect, server.url)
        received = await ask(client, session_id, text)
        assert received["escalation"]["trigger"] == "keyword", text
        assert received["escalation"]["reason"] == reason
        assert (await client.wait_for("escalation-needed"))[0]["trigger"] == "keyword"


async def test_an_upset_visitor_is_offered_a_person(start_server, connect, http) -> None:
    server = await start_server(agent_api_keys=AGENT_KEYS)
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "This is ridiculous, your answers are useless!")
    escalation = received["escalation"]
    assert escalation["trigger"] == "sentiment" and "anger" in escalation["reason"]
    assert (await client.wait_for("escalation-needed"))[0]["trigger"] == "sentiment"
    assert (await escalations_today(server.url)).get("sentiment") == 1
    _, text = await http.get_text(f"{server.url}/metrics")
    assert 'support_escalations_total{trigger="sentiment"} 1.0' in text


async def test_negative_messages_again_and_again_escalate_on_sentiment(server, connect) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    texts = (
        "My card keeps getting rejected at checkout",
        "I picked the wrong colour by mistake, can I still cancel the order?",
        "And now part of my order is missing and the wrong item came.",
    )
    assert (await ask(client, session_id, texts[0]))["escalation"] is None
    assert (await ask(client, session_id, texts[1]))["escalation"] is None
    escalation = (await ask(client, session_id, texts[2]))["escalation"]
    assert escalation["trigger"] == "sentiment" and "last 3 messages in a row" in escalation["reason"]


async def test_sentiment_is_off_with_its_thresholds(start_server, connect) -> None:
    server = await start_server(sentiment_threshold=-1.0, sentiment_negatives_in_a_row=0)
    client, session_id, _ = await joined_client(connect, server.url)
    assert (await ask(client, session_id, "you stupid useless bot"))["escalation"] is None


async def test_every_trigger_is_counted_per_day(start_server, connect) -> None:
    server = await start_server(agent_api_keys=(("alex", Secret(KEY)),))
    for text in ("I want a human", "you stupid useless bot"):
        client, session_id, _ = await joined_client(connect, server.url)
        await ask(client, session_id, text)
    client, session_id, _ = await joined_client(connect, server.url)
    assert (await client.call("escalate", {"sessionId": session_id}))["ok"]
    await client.wait_for("escalation-needed")
    counted = await escalations_today(server.url)
    assert counted == {"keyword": 1, "sentiment": 1, "user_request": 1}


async def test_the_issues_examples_answer_offline_without_escalating(start_server, connect) -> None:
    """Issue 14's examples, asked in one conversation with no API key: none escalates, none opens a ticket."""
    server = await start_server(ai_providers=("local",), agent_api_keys=AGENT_KEYS)
    client, session_id, _ = await joined_client(connect, server.url)
    for text in (
        "I want to return a lamp I bought two weeks ago. How do I do that?",
        "Can I send back a lamp I don't like?",
        "Do you sell gift cards?",
        "What is the capital of France?",
        "I want a refund",
    ):
        received = await ask(client, session_id, text)
        assert received["escalation"] is None, (text, received["message"]["content"][:200])
    assert client.of("escalation-needed") == [] and await tickets(server.url) == []
