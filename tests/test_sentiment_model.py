"""SENTIMENT_MODEL=provider (issue 14): the configured OpenAI model scores how upset each visitor message reads, beside
the answer; at or above SENTIMENT_MODEL_THRESHOLD it escalates with `sentiment`. A failure or a timeout leaves the
decision to the lexicon without delaying the reply beyond SENTIMENT_MODEL_TIMEOUT; `lexicon` makes no such call.
Real servers, Redis, Socket.IO clients and the provider double."""

from __future__ import annotations

import time
from typing import Any

from devtools.provider_double import SENTIMENT_INSTRUCTION, ProviderDouble
from server.chat.mood_model import INSTRUCTION, METRICS_LABEL
from server.chat.sentiment import SentimentReader
from server.settings import Secret, Settings
from tests.clients import ConnectFactory, Http, joined_client
from tests.servers import RunningServer, ServerFactory

CALM_BUT_UPSET = "I have been waiting two weeks for my order."  # VADER: 0.0
NEGATIVE_NOT_SEVERE = "I picked the wrong colour by mistake, can I still cancel the order?"  # VADER: about -0.76
ANGRY = "you stupid useless bot"  # the lexicon escalates it at once (words of anger)


async def ask(client: Any, session_id: str, text: str) -> dict[str, Any]:
    sent = await client.call("send-message", {"sessionId": session_id, "message": text})
    assert sent["ok"], sent
    received: dict[str, Any] = await client.reply_to(sent["messageId"])
    return received


def test_the_double_knows_the_instruction() -> None:
    assert INSTRUCTION.startswith(SENTIMENT_INSTRUCTION)
    reader = SentimentReader()
    assert reader.read(CALM_BUT_UPSET).score > -0.5
    calm = reader.read(NEGATIVE_NOT_SEVERE)
    assert -0.8 < calm.score <= -0.5 and not calm.angry_words  # negative, not severe: counts, never escalates alone


async def test_a_message_the_model_scores_upset_escalates_though_the_lexicon_would_not(
    start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble, http: Http, settings: Settings
) -> None:
    server = await start_server(sentiment_model="provider")
    double.set_mode("sentiment", "ok", upset=0.8765)
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, CALM_BUT_UPSET)
    escalation = received["escalation"]
    assert escalation["trigger"] == "sentiment" and "sentiment model" in escalation["reason"]
    assert (await client.wait_for("escalation-needed"))[0]["trigger"] == "sentiment"
    [call] = double.requests["sentiment"]
    body = call["body"]
    assert body["model"] == settings.openai_model
    assert body["response_format"] == {"type": "json_object"} and body["temperature"] == 0 and body["max_tokens"] <= 32
    assert "stream" not in body and body["messages"][0] == {"role": "system", "content": INSTRUCTION}
    assert body["messages"][1] == {"role": "user", "content": CALM_BUT_UPSET}
    assert len(double.requests["openai"]) == 1  # the answer's own call, counted apart
    seen = repr(client.events)
    assert '"upset"' not in seen and "0.87" not in seen  # the classification never reaches the room
    _, text = await http.get_text(f"{server.url}/metrics")
    assert f'support_provider_requests_total{{provider="{METRICS_LABEL}"}} 1.0' in text
    assert f'support_provider_failures_total{{provider="{METRICS_LABEL}"}} 0.0' in text


async def test_a_calm_score_keeps_a_negative_message_from_escalating(
    start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble
) -> None:
    server = await start_server(sentiment_model="provider")
    double.set_mode("sentiment", "ok", scores={"colour": 0.1, "stupid": 0.2})
    client, session_id, _ = await joined_client(connect, server.url)
    assert (await ask(client, session_id, NEGATIVE_NOT_SEVERE))["escalation"] is None
    # The model decides "upset now": even words the lexicon takes for anger do not escalate when it reads them calm.
    assert (await ask(client, session_id, ANGRY))["escalation"] is None
    assert client.of("escalation-needed") == []
    assert len(double.requests["sentiment"]) == 2


async def test_the_lexicons_negatives_in_a_row_still_escalate(
    start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble
) -> None:
    server = await start_server(sentiment_model="provider", sentiment_negatives_in_a_row=2)
    double.set_mode("sentiment", "ok", upset=0.2)
    client, session_id, _ = await joined_client(connect, server.url)
    assert (await ask(client, session_id, NEGATIVE_NOT_SEVERE))["escalation"] is None
    escalation = (await ask(client, session_id, "And now part of my order is missing and the wrong item came."))["escalation"]
    assert escalation["trigger"] == "sentiment" and "last 2 messages in a row" in escalation["reason"]


async def test_a_failing_model_leaves_the_decision_to_the_lexicon(
    start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble, http: Http
) -> None:
    server = await start_server(sentiment_model="provider")
    double.set_mode("sentiment", "status", status=500)
    client, session_id, _ = await joined_client(connect, server.url)
    escalation = (await ask(client, session_id, ANGRY))["escalation"]
    assert escalation["trigger"] == "sentiment" and "anger" in escalation["reason"]  # the lexicon's rule
    double.set_mode("sentiment", "malformed")
    assert (await ask(client, session_id, CALM_BUT_UPSET))["escalation"] is None
    assert len(double.requests["sentiment"]) == 2
    _, text = await http.get_text(f"{server.url}/metrics")
    assert f'support_provider_failures_total{{provider="{METRICS_LABEL}"}} 2.0' in text


async def test_a_hanging_model_does_not_delay_the_reply_beyond_its_timeout(
    start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble
) -> None:
    server = await start_server(sentiment_model="provider", sentiment_model_timeout=0.5)
    double.set_mode("sentiment", "hang")
    client, session_id, _ = await joined_client(connect, server.url)
    started = time.perf_counter()
    received = await ask(client, session_id, ANGRY)
    elapsed = time.perf_counter() - started
    assert received["escalation"]["trigger"] == "sentiment"  # the lexicon decided
    assert elapsed < 0.5 + 1.0, elapsed
    # A calm message, with the model still hanging: answered, not escalated, as quickly.
    started = time.perf_counter()
    assert (await ask(client, session_id, CALM_BUT_UPSET))["escalation"] is None
    assert time.perf_counter() - started < 0.5 + 1.0


async def test_a_slow_model_streams_the_answer_first(
    start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble
) -> None:
    """The classification runs beside the answer: the reply's text arrives before the model has scored."""
    server = await start_server(sentiment_model="provider", sentiment_model_timeout=1.5)
    double.set_mode("sentiment", "ok", upset=0.95, delay=0.8)
    double.set_mode("openai", "ok", tokens=100, chunk_delay=0.005)
    client, session_id, _ = await joined_client(connect, server.url)
    started = time.perf_counter()
    sent = await client.call("send-message", {"sessionId": session_id, "message": CALM_BUT_UPSET})
    await client.wait_for("message-chunk")
    first_chunk = time.perf_counter() - started
    received = await client.reply_to(sent["messageId"])
    assert first_chunk < 0.6, first_chunk
    assert received["escalation"]["trigger"] == "sentiment"  # awaited where the escalation is decided


async def test_each_text_is_classified_once(start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble) -> None:
    server = await start_server(sentiment_model="provider")
    double.set_mode("sentiment", "ok", upset=0.1)
    client, session_id, _ = await joined_client(connect, server.url)
    await ask(client, session_id, "Where is my parcel?")
    await ask(client, session_id, " Where is   my parcel?")  # whitespace is normalised (case and "!" tell)
    assert len(double.requests["sentiment"]) == 1


async def test_lexicon_mode_makes_no_classification_call(
    server: RunningServer, connect: ConnectFactory, double: ProviderDouble
) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    assert (await ask(client, session_id, CALM_BUT_UPSET))["escalation"] is None
    assert (await ask(client, session_id, ANGRY))["escalation"]["trigger"] == "sentiment"
    assert double.requests["sentiment"] == []


async def test_provider_mode_without_a_key_is_the_lexicon(
    start_server: ServerFactory, connect: ConnectFactory, double: ProviderDouble
) -> None:
    server = await start_server(sentiment_model="provider", openai_api_key=Secret(None), ai_providers=("local",))
    client, session_id, _ = await joined_client(connect, server.url)
    assert (await ask(client, session_id, ANGRY))["escalation"]["trigger"] == "sentiment"
    assert double.requests["sentiment"] == []
