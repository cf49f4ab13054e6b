"""One provider suite, run on both transports (direct HTTP and the SDKs) against the same double, so they cannot drift."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from devtools.provider_double import ProviderDouble
from server.ai.http import ProviderHTTP
from server.ai.knowledge import KnowledgeBase
from server.ai.providers.base import AIProvider, ChatTurn, Finished, ProviderError, ProviderRequest, StreamEvent, TextDelta
from server.app import build_providers
from server.settings import Secret, Settings

TRANSPORTS = ("direct", "sdk")
PROVIDERS = ("openai", "gemini")
CASES = [(transport, provider) for transport in TRANSPORTS for provider in PROVIDERS]
CASE_IDS = [f"{transport}-{provider}" for transport, provider in CASES]

REQUEST = ProviderRequest(
    "You are helpful.", [ChatTurn("user", "hi"), ChatTurn("assistant", "hello!")], "Where is my parcel?", max_tokens=64
)

# Where the SDKs name a failure by their own exception types, the reason differs by transport; everything else
# (statuses, Retry-After, timeouts, empty or unfinished answers, malformed figures) is the same string.
MALFORMED = {"direct": {"openai": "MalformedStream", "gemini": "MalformedStream"},
             "sdk": {"openai": "MalformedStream", "gemini": "UnknownApiResponseError"}}  # fmt: skip
CUT = {"direct": {"openai": "ClientPayloadError", "gemini": "ClientPayloadError"},
       "sdk": {"openai": "ReadError", "gemini": "ClientPayloadError"}}  # fmt: skip

Build = Callable[..., AIProvider]


@pytest.fixture
async def build(double: ProviderDouble, tmp_path: Path) -> AsyncIterator[Build]:
    """Providers as the app builds them (build_providers), on one shared pool; all closed after the test."""
    http = ProviderHTTP()
    await http.start()
    made: list[AIProvider] = []
    knowledge = KnowledgeBase([])

    def make(transport: str, provider: str, target: ProviderDouble | None = None, **overrides: object) -> AIProvider:
        fake = target or double
        settings = Settings(
            openai_api_key=Secret("sk-test-openai-key"),
            openai_base_url=fake.openai_base_url,
            gemini_api_key=Secret("g-test-gemini-key"),
            gemini_base_url=fake.gemini_base_url,
            openai_client=transport,
            gemini_client=transport,
            ai_providers=(provider,),
            ai_request_timeout=2.0,
            data_dir=tmp_path,
        )
        (made_one,) = build_providers(dataclasses.replace(settings, **overrides), knowledge, http)
        made.append(made_one)
        return made_one

    yield make
    for provider in made:
        await provider.aclose()
    await http.aclose()


async def collect(provider: AIProvider, request: ProviderRequest = REQUEST) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


async def failure(provider: AIProvider) -> tuple[ProviderError, list[StreamEvent]]:
    """The ProviderError a call ends in, and the events before it."""
    events: list[StreamEvent] = []
    with pytest.raises(ProviderError) as caught:
        async for event in provider.stream(REQUEST):
            events.append(event)
    return caught.value, events


def answer(events: list[StreamEvent]) -> tuple[str, Finished]:
    """The text of a complete answer and its end."""
    *deltas, end = events
    assert all(isinstance(d, TextDelta) for d in deltas) and isinstance(end, Finished)
    return "".join(d.text for d in deltas if isinstance(d, TextDelta)), end


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_an_answer_streams_with_its_confidence_usage_and_request(build, double, transport, name) -> None:
    provider = build(transport, name)
    text, end = answer(await collect(provider))
    assert text == "Echo: Where is my parcel?"
    assert end == Finished(confidence=pytest.approx(math.exp(-0.05)), input_tokens=10, output_tokens=5)
    (sent,) = double.requests[name]
    assert sent["stream"] is True
    if name == "openai":
        assert sent["path"] == "/v1/chat/completions" and sent["headers"]["Authorization"] == "Bearer sk-test-openai-key"
        assert sent["body"]["messages"] == [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "Where is my parcel?"},
        ]
        assert sent["body"]["stream_options"] == {"include_usage": True} and sent["body"]["logprobs"] is True
        assert sent["body"]["max_tokens"] == 64 and sent["body"]["model"] == "gpt-4.1-mini"
    else:
        assert sent["path"] == "/v1/models/gemini-2.5-flash:streamGenerateContent"
        assert sent["headers"]["x-goog-api-key"] == "g-test-gemini-key"
        assert sent["body"]["contents"] == [
            {"role": "user", "parts": [{"text": "hi"}]},
            {"role": "model", "parts": [{"text": "hello!"}]},
            {"role": "user", "parts": [{"text": "Where is my parcel?"}]},
        ]
        assert sent["body"]["systemInstruction"] == {"parts": [{"text": "You are helpful."}]}
        assert sent["body"]["generationConfig"] == {"maxOutputTokens": 64}


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_logprobs_become_confidence_and_their_absence_none(build, double, transport, name) -> None:
    provider = build(transport, name)
    double.set_mode(name, "low_logprobs")
    assert answer(await collect(provider))[1].confidence == pytest.approx(math.exp(-3.0))
    double.set_mode(name, "no_logprobs")
    expected = None if name == "gemini" else pytest.approx(math.exp(-0.05))  # the double's OpenAI always sends them
    assert answer(await collect(provider))[1].confidence == expected


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("status", "retry_after"), [(500, None), (401, None), (429, 7), (503, 0.5)])
async def test_a_status_error_is_its_status_with_retry_after(build, double, transport, name, status, retry_after) -> None:
    provider = build(transport, name)
    double.set_mode(name, "status", status=status, retry_after=retry_after)
    error, events = await failure(provider)
    assert events == [] and error.reason == f"HTTP {status}"
    assert error.retry_after == (None if retry_after is None else float(retry_after))
    assert len(double.requests[name]) == 1  # no retries of their own: failover is the retry


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_malformed_empty_and_unfinished_streams_fail(build, double, transport, name) -> None:
    provider = build(transport, name)
    double.set_mode(name, "malformed")
    assert (await failure(provider))[0].reason == MALFORMED[transport][name]
    double.set_mode(name, "empty")
    assert (await failure(provider))[0].reason == "empty answer"
    double.set_mode(name, "no_finish", after=2)
    error, events = await failure(provider)
    assert error.reason == "stream ended without a finish reason" and events


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_malformed_figures_fail_the_answer(build, double, transport, name) -> None:
    provider = build(transport, name)
    double.set_mode(name, "ok", logprob=1000)
    assert (await failure(provider))[0].reason == "malformed answer: logprob out of range"
    double.set_mode(name, "ok", prompt_tokens=-3)
    assert (await failure(provider))[0].reason == "malformed answer: token count out of range"
    double.set_mode(name, "ok", prompt_tokens="lots")  # the SDK's pydantic models refuse it first
    expected = "ValidationError" if (transport, name) == ("sdk", "gemini") else "malformed answer: token count is not a number"
    assert (await failure(provider))[0].reason == expected


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_a_cut_connection_fails_before_or_after_deltas(build, double, transport, name) -> None:
    provider = build(transport, name)
    double.set_mode(name, "cut", after=0)
    error, events = await failure(provider)
    assert error.reason == CUT[transport][name] and events == []
    double.set_mode(name, "cut", after=2, reply="one two three four five")
    error, events = await failure(provider)
    assert error.reason == CUT[transport][name]
    assert events and "".join(e.text for e in events if isinstance(e, TextDelta)) in ("one ", "one two ")


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_a_silent_provider_times_out(build, double, transport, name) -> None:
    provider = build(transport, name, ai_request_timeout=0.3)
    double.set_mode(name, "hang")
    assert (await failure(provider))[0].reason == "timeout"


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_a_refused_connection_fails(build, transport, name) -> None:
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    provider = build(transport, name, openai_base_url=url + "/v1", gemini_base_url=url)
    error, _ = await failure(provider)
    assert error.reason in ("ClientConnectorError", "timeout")  # the openai SDK calls a refusal a connect timeout


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "options", [{"gzip": True}, {"split": 5}, {"split": 3, "gzip": True}], ids=["gzip", "split", "gzip-split"]
)
async def test_compressed_and_split_bodies_read_like_plain_ones(build, double, transport, name, options) -> None:
    provider = build(transport, name)
    double.set_mode(name, "ok", reply="Grüße aus 日本 🚀 — fertig", **options)
    text, end = answer(await collect(provider))
    assert text == "Grüße aus 日本 🚀 — fertig" and end.output_tokens == 6


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_a_long_streamed_answer_arrives_whole(build, double, transport, name) -> None:
    provider = build(transport, name)
    double.set_mode(name, "ok", tokens=300, chunk_delay=0.001)
    text, end = answer(await collect(provider))
    assert text.split() == [f"tok{i}" for i in range(300)] and end.output_tokens == 300


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_closing_a_stream_early_closes_it_at_the_provider(build, double, transport, name, request) -> None:
    if (transport, name) == ("sdk", "gemini"):
        reason = "google-genai leaves open a stream its caller closed (the direct transport closes it)"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    provider = build(transport, name)
    double.set_mode(name, "ok", tokens=400, chunk_delay=0.01)
    events = provider.stream(REQUEST)
    assert isinstance(await anext(events), TextDelta)
    await events.aclose()
    assert await double.wait_closed_early(name, timeout=5)


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_the_connection_is_kept_alive_across_answers_and_errors(build, double, transport, name) -> None:
    provider = build(transport, name)
    await collect(provider)
    double.set_mode(name, "status", status=500)
    await failure(provider)
    double.set_mode(name, "ok")
    answer(await collect(provider))
    peers = [r["peer"] for r in double.requests[name]]
    assert len(peers) == 3 and len(set(peers)) == 1, peers


@pytest.mark.parametrize(("transport", "name"), CASES, ids=CASE_IDS)
async def test_a_server_closing_idle_connections_costs_no_failure(build, transport, name) -> None:
    closing = ProviderDouble(keepalive_timeout=0.2)
    await closing.start()
    try:
        provider = build(transport, name, target=closing)
        answer(await collect(provider))
        await asyncio.sleep(0.6)  # the server has closed the idle connection by now
        answer(await collect(provider))
        peers = [r["peer"] for r in closing.requests[name]]
        assert len(peers) == 2 and peers[0] != peers[1]
    finally:
        await closing.close()


@pytest.mark.parametrize("name", PROVIDERS)
async def test_direct_a_pooled_connection_closed_as_it_is_used_is_retried_once(build, double, name) -> None:
    """The race a keep-alive pool has with a server closing idle connections; the SDKs' retries are off, so direct only."""
    provider = build("direct", name)
    answer(await collect(provider))
    double.set_mode(name, "ok", drop_reused=True)
    text, _ = answer(await collect(provider))  # sent on the pooled connection, dropped, sent again on a new one
    assert text == "Echo: Where is my parcel?"
    assert double.dropped[name] == 1 and len(double.requests[name]) == 2
    error, _ = await failure(build("direct", name, openai_base_url="http://127.0.0.1:1/v1", gemini_base_url="http://127.0.0.1:1"))
    assert error.reason == "ClientConnectorError"  # a fresh connection that fails is not retried


async def test_direct_providers_share_one_pool(build, double) -> None:
    openai, gemini = build("direct", "openai"), build("direct", "gemini")
    await asyncio.gather(collect(openai), collect(gemini))
    assert answer(await collect(openai))[0] == answer(await collect(gemini))[0] == "Echo: Where is my parcel?"
    peers = {r["peer"] for name in PROVIDERS for r in double.requests[name]}
    assert len(peers) <= 2  # the two concurrent calls opened at most two connections, reused after


def test_an_unknown_transport_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="OPENAI_CLIENT"):
        build_providers(Settings(openai_client="grpc", data_dir=tmp_path), KnowledgeBase([]))


def test_the_transports_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().openai_client, Settings().gemini_client) == ("direct", "direct")
    monkeypatch.setenv("OPENAI_CLIENT", " SDK ")
    monkeypatch.setenv("GEMINI_CLIENT", "direct")
    settings = Settings.from_env(env_file=None)
    assert (settings.openai_client, settings.gemini_client) == ("sdk", "direct")


async def test_the_app_sends_every_reply_over_one_pooled_connection(server, connect, double) -> None:
    from tests.clients import joined_client

    client, session_id, _ = await joined_client(connect, server.url)
    for text in ("first", "second", "third"):
        sent = await client.call("send-message", {"sessionId": session_id, "message": text})
        received = await client.reply_to(sent["messageId"])
        assert received["message"]["provider"] == "openai" and received["message"]["content"] == f"Echo: {text}"
    assert len({r["peer"] for r in double.requests["openai"]}) == 1  # opened at start-up, kept alive, no client per call
