"""Failover on every fault, circuit breakers, and the four escalation triggers."""

from __future__ import annotations

import asyncio
import json

import pytest

from devtools.provider_double import ProviderDouble
from server.ai.breaker import CircuitBreaker
from server.app_keys import CHAIN
from tests.clients import Recorder, joined_client, request
from tests.fakes import FakeClock
from tests.processes import free_port
from tests.servers import RunningServer

BOTH_PROVIDER_TRANSPORTS = True  # every test here runs with OPENAI_CLIENT/GEMINI_CLIENT=direct and =sdk


async def ask(client, session_id: str, text: str, timeout: float = 10) -> dict:
    sent = await client.call("send-message", {"sessionId": session_id, "message": text})
    assert sent["ok"], sent
    return await client.reply_to(sent["messageId"], timeout=timeout)


async def health(server: RunningServer) -> dict:
    return (await request("GET", f"{server.url}/api/v1/health")).body


def breakers_on(server: RunningServer, clock: FakeClock) -> None:
    """Put the server's circuit breakers on `clock` (before any call), so a test moves time instead of sleeping."""
    chain = server.app[CHAIN]
    for name, breaker in list(chain.breakers.items()):
        chain.breakers[name] = CircuitBreaker(breaker.threshold, breaker.cooldown, clock)


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("status", {"status": 500}),
        ("status", {"status": 401}),
        ("status", {"status": 400}),
        ("status", {"status": 429, "retry_after": 1}),
        ("malformed", {}),
        ("empty", {}),
        ("hang", {}),
        ("cut", {"after": 0}),
    ],
)
async def test_openai_fault_moves_to_gemini_within_one_request(server, connect, double, mode, options) -> None:
    double.set_mode("openai", mode, **options)
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "Is my order shipped?")
    assert received["message"]["provider"] == "gemini"
    assert received["message"]["content"] == "Echo: Is my order shipped?"
    assert received["escalation"] is None
    assert len(double.requests["openai"]) == 1  # the SDK's own retries are off


async def test_refused_connection_fails_over(start_server, connect, double) -> None:
    server = await start_server(openai_base_url=f"http://127.0.0.1:{free_port()}/v1")
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "hello")
    assert received["message"]["provider"] == "gemini"


async def test_both_failing_falls_back_to_local_knowledge(server, connect, double) -> None:
    double.set_mode("both", "status", status=503)
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "How long does standard shipping take?")
    message = received["message"]
    assert message["provider"] == "local" and message["role"] == "assistant"
    assert "business days" in message["content"]
    assert message["confidence"] >= 0.5 and received["escalation"] is None


async def test_all_failing_without_local_gives_system_message_and_error_escalation(
    start_server, connect, double, redis_sync
) -> None:
    server = await start_server(ai_providers=("openai", "gemini"))
    double.set_mode("both", "status", status=500)
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "anyone there?")
    assert received["message"]["role"] == "system" and "follow up" in received["message"]["content"]
    assert received["escalation"]["trigger"] == "error" and received["escalation"]["sessionId"] == session_id
    escalation = (await client.wait_for("escalation-needed"))[0]
    assert escalation["trigger"] == "error" and set(escalation) == {"sessionId", "trigger", "reason", "createdAt"}
    assert redis_sync.llen(f"chat:escalations:{{{session_id}}}") == 1


async def test_provider_without_key_is_skipped(start_server, connect, double) -> None:
    from server.settings import Secret

    server = await start_server(openai_api_key=Secret(None))
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "hi")
    assert received["message"]["provider"] == "gemini"
    assert double.requests["openai"] == []
    assert (await client.wait_for("chat-joined"))[0]["providers"] == ["gemini", "local"]


async def test_breaker_opens_half_opens_and_closes(start_server, connect, double) -> None:
    server = await start_server(provider_failure_threshold=2, provider_cooldown=1.0)
    clock = FakeClock()
    breakers_on(server, clock)
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "status", status=500)
    for _ in range(2):
        assert (await ask(client, session_id, "q"))["message"]["provider"] == "gemini"
    assert len(double.requests["openai"]) == 2
    states = {p["name"]: p for p in (await health(server))["providers"]}
    assert states["openai"]["state"] == "open" and states["openai"]["failures"] == 2

    # open: skipped without a call
    assert (await ask(client, session_id, "q"))["message"]["provider"] == "gemini"
    assert len(double.requests["openai"]) == 2

    clock.advance(1.1)
    states = {p["name"]: p for p in (await health(server))["providers"]}
    assert states["openai"]["state"] == "half_open"
    # half open: one trial, which fails and re-opens at once
    assert (await ask(client, session_id, "q"))["message"]["provider"] == "gemini"
    assert len(double.requests["openai"]) == 3
    assert {p["name"]: p for p in (await health(server))["providers"]}["openai"]["state"] == "open"

    clock.advance(1.1)
    double.set_mode("openai", "ok")
    assert (await ask(client, session_id, "q"))["message"]["provider"] == "openai"
    assert {p["name"]: p for p in (await health(server))["providers"]}["openai"]["state"] == "closed"


async def test_rate_limit_retry_after_opens_the_circuit_for_that_long(start_server, connect, double) -> None:
    server = await start_server(provider_failure_threshold=5)
    clock = FakeClock()
    breakers_on(server, clock)
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "status", status=429, retry_after=1)
    assert (await ask(client, session_id, "q"))["message"]["provider"] == "gemini"
    double.set_mode("openai", "ok")
    assert (await ask(client, session_id, "q"))["message"]["provider"] == "gemini"
    assert len(double.requests["openai"]) == 1
    clock.advance(1.1)
    assert (await ask(client, session_id, "q"))["message"]["provider"] == "openai"


@pytest.mark.parametrize("text", ["I will call my LAWYER!", "This is Fraud", "let me talk to a human please"])
async def test_keyword_escalation(server, connect, text) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, text)
    assert received["message"]["role"] == "assistant"
    assert received["escalation"]["trigger"] == "keyword"
    assert (await client.wait_for("escalation-needed"))[0]["trigger"] == "keyword"


async def test_keywords_match_whole_words_only(server, connect) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "My agentic humanoid robot arrived refunded? no: refundable")
    assert received["escalation"] is None


async def test_low_confidence_escalates_and_null_confidence_does_not(server, connect, double) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("openai", "low_logprobs")
    first = await ask(client, session_id, "How long does standard shipping take?")
    assert first["message"]["confidence"] < 0.5 and first["escalation"] is None  # one miss: the visitor may rephrase
    received = await ask(client, session_id, "how many days does normal shipping take?")
    assert received["message"]["confidence"] < 0.5
    assert received["escalation"]["trigger"] == "low_confidence"


async def test_user_request_escalation(server, connect) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    ack = await client.call("escalate", {"sessionId": session_id, "reason": "I'd like a person"})
    assert ack == {"ok": True}
    escalation = (await client.wait_for("escalation-needed"))[0]
    assert escalation["trigger"] == "user_request" and escalation["reason"] == "I'd like a person"


async def test_no_confidence_signal_is_null_and_never_low(server, connect, double) -> None:
    double.set_mode("openai", "status", status=500)
    double.set_mode("gemini", "no_logprobs")
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "hello?")
    assert received["message"]["provider"] == "gemini"
    assert received["message"]["confidence"] is None and received["escalation"] is None


async def test_knowledge_entries_go_into_the_system_prompt(server, connect, double) -> None:
    client, session_id, _ = await joined_client(connect, server.url)
    await ask(client, session_id, "How long does standard shipping take?")
    system = double.requests["openai"][-1]["body"]["messages"][0]["content"]
    assert "<knowledge_base>" in system and "3-5 business days" in system and "Northwind Goods" in system
    double.set_mode("openai", "status", status=500)
    await ask(client, session_id, "Which payment methods do you accept?")
    gemini_body = double.requests["gemini"][-1]["body"]
    instruction = json.dumps(gemini_body.get("systemInstruction") or gemini_body.get("system_instruction"))
    assert "<knowledge_base>" in instruction and "Visa" in instruction


async def test_a_compressed_event_stream_is_read_like_a_plain_one(server, connect, double) -> None:
    double.set_mode("openai", "ok", gzip=True)
    client, session_id, _ = await joined_client(connect, server.url)
    received = await ask(client, session_id, "squeezed?")
    assert received["message"]["provider"] == "openai"
    assert received["message"]["content"] == "Echo: squeezed?"


async def states(server: RunningServer) -> dict[str, str]:
    """Each provider's circuit state, as health reports it."""
    return {p["name"]: p["state"] for p in (await health(server))["providers"]}


async def open_every_circuit(server: RunningServer, client: Recorder, session_id: str, double: ProviderDouble) -> None:
    """Fail messages (both providers answering 500) until health shows both circuits open."""
    double.set_mode("both", "status", status=500)
    for _ in range(10):
        received = await ask(client, session_id, "anyone there?")
        assert received["message"]["role"] == "system"
        if await states(server) == {"openai": "open", "gemini": "open"}:
            return
    raise AssertionError(f"circuits never all opened: {await states(server)}")


async def wait_requests(double: ProviderDouble, provider: str, count: int) -> None:
    """Until the double has seen `count` requests for the provider (the call is in flight)."""
    for _ in range(500):
        if len(double.requests[provider]) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{provider} never got request {count}")


async def test_when_every_circuit_is_open_a_recovered_provider_answers_at_once(start_server, connect, double) -> None:
    server = await start_server(ai_providers=("openai", "gemini"), provider_cooldown=300)
    client, session_id, _ = await joined_client(connect, server.url)
    await open_every_circuit(server, client, session_id, double)

    double.set_mode("both", "ok")
    gemini_calls = len(double.requests["gemini"])
    received = await ask(client, session_id, "are you back?")
    # openai opened first, so its open period ends first: it is the one probed, long before its 300 s cooldown
    assert received["message"]["role"] == "assistant" and received["message"]["provider"] == "openai"
    assert received["message"]["content"] == "Echo: are you back?" and received["escalation"] is None
    assert len(double.requests["gemini"]) == gemini_calls  # exactly one provider probed
    assert await states(server) == {"openai": "closed", "gemini": "open"}


async def test_a_failed_probe_reopens_its_circuit_and_the_message_escalates(start_server, connect, double) -> None:
    server = await start_server(ai_providers=("openai", "gemini"), provider_cooldown=300)
    client, session_id, _ = await joined_client(connect, server.url)
    await open_every_circuit(server, client, session_id, double)
    before = {p: len(double.requests[p]) for p in ("openai", "gemini")}

    received = await ask(client, session_id, "still down?")
    assert received["message"]["role"] == "system" and "follow up" in received["message"]["content"]
    assert received["escalation"]["trigger"] == "error"
    assert {p: len(double.requests[p]) - before[p] for p in before} == {"openai": 1, "gemini": 0}
    assert await states(server) == {"openai": "open", "gemini": "open"}

    # openai's failed probe re-opened it for a whole cooldown, so gemini's open period now ends first
    await ask(client, session_id, "and now?")
    assert {p: len(double.requests[p]) - before[p] for p in before} == {"openai": 1, "gemini": 1}
    assert await states(server) == {"openai": "open", "gemini": "open"}


@pytest.mark.slow  # probes hang until the first-token timeout
async def test_concurrent_messages_in_a_panic_probe_each_dead_provider_once(start_server, connect, double) -> None:
    server = await start_server(ai_providers=("openai", "gemini"), provider_cooldown=300)
    client, session_id, _ = await joined_client(connect, server.url)
    await open_every_circuit(server, client, session_id, double)
    before = {p: len(double.requests[p]) for p in ("openai", "gemini")}
    double.set_mode("both", "hang")  # probes hang until the 2 s first-token timeout
    others = [await joined_client(connect, server.url, user_id=f"u{i}") for i in range(4)]

    async def send(index: int) -> str:
        other, other_session, _ = others[index]
        sent = await other.call("send-message", {"sessionId": other_session, "message": "hello?"})
        assert sent["ok"], sent
        return sent["messageId"]

    first = await send(0)
    await wait_requests(double, "openai", before["openai"] + 1)
    second = await send(1)
    await wait_requests(double, "gemini", before["gemini"] + 1)  # openai is being probed: the next one is
    assert await states(server) == {"openai": "open", "gemini": "open"}  # true states while probes are in flight
    # both dead providers are being probed: further messages fail fast instead of piling on
    for index in (2, 3):
        message_id = await send(index)
        received = await others[index][0].reply_to(message_id)
        assert received["message"]["role"] == "system" and received["escalation"]["trigger"] == "error"
    for index, message_id in ((0, first), (1, second)):
        received = await others[index][0].reply_to(message_id)
        assert received["message"]["role"] == "system" and received["escalation"]["trigger"] == "error"
    assert {p: len(double.requests[p]) - before[p] for p in before} == {"openai": 1, "gemini": 1}
    assert await states(server) == {"openai": "open", "gemini": "open"}


async def test_an_escalation_summary_does_not_count_towards_opening_a_circuit(start_server, connect, double) -> None:
    server = await start_server(ai_providers=("openai", "gemini"), provider_failure_threshold=2)
    client, session_id, _ = await joined_client(connect, server.url)
    double.set_mode("both", "status", status=500)
    received = await ask(client, session_id, "anyone there?")
    assert received["escalation"]["trigger"] == "error"
    await client.wait_for("contact-requested")  # the ticket, with its summary, is written
    assert {p: len(double.requests[p]) for p in ("openai", "gemini")} == {"openai": 2, "gemini": 2}
    assert await states(server) == {"openai": "closed", "gemini": "closed"}
    await ask(client, session_id, "hello?")  # the second failed message opens both
    assert await states(server) == {"openai": "open", "gemini": "open"}
