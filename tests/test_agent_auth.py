"""Agent keys cannot be guessed: failed sign-ins are throttled and locked out per client address, logged with that
address (never the key), and weak keys stop the server from starting (issue 11, item 10)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from loguru import logger

from server.app import create_app
from server.settings import Secret, Settings, WeakAgentKeyError, parse_agent_keys
from tests.clients import Http

pytestmark = pytest.mark.slow  # sign-in lockouts, and a server process refusing a weak key

ROOT = Path(__file__).resolve().parent.parent
AGENT_KEY = "lee-key-8d41-77c2-b09e"
METRICS_KEY = "scrape-key-6f3a-91d0-e2c4"
PROXY = ("127.0.0.1/32",)  # the test client plays a proxy, so X-Forwarded-For picks the client address
AGENT_ROUTES = (
    ("GET", "/api/v1/tickets"),
    ("GET", "/api/v1/tickets/T-0000000000"),
    ("POST", "/api/v1/tickets/T-0000000000/resolve"),
    ("GET", "/api/v1/analytics"),
)


async def rest(
    http: Http, url: str, key: str | None, ip: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, Any], str | None]:
    """One REST call with an agent key (and a forwarded client address): status, JSON body, Retry-After."""
    status, body, headers = await http.request(method, url, token=key, headers={"X-Forwarded-For": ip} if ip else None)
    return status, body if isinstance(body, dict) else {}, headers.get("Retry-After")


async def agent_connect(
    http: Http, url: str, key: str | None, ip: str | None = None, ws: aiohttp.ClientWebSocketResponse | None = None
) -> tuple[str, dict[str, Any]]:
    """Join /agents with `key` over a raw WebSocket: ("connected", {sid}) or ("refused", the connect_error's data)."""
    headers = {"X-Forwarded-For": ip} if ip is not None else {}
    socket = ws or await http.session.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket", headers=headers)
    try:
        if ws is None:
            assert (await socket.receive_str(timeout=5)).startswith("0")
        await socket.send_str("40/agents," + (orjson.dumps({"key": key}).decode() if key is not None else ""))
        while True:
            text = await socket.receive_str(timeout=5)
            if text.startswith("40/agents,"):
                return "connected", orjson.loads(text[len("40/agents,") :])
            if text.startswith("44/agents,"):  # {message, data}: socket.io clients see `data` as err.data
                return "refused", orjson.loads(text[len("44/agents,") :]).get("data") or {}
    finally:
        if ws is None:
            await socket.close()


async def test_rest_guessing_locks_the_address_out_even_for_the_right_key(start_server, redis_sync, http) -> None:
    server = await start_server(
        agent_api_keys=(("lee", Secret(AGENT_KEY)),),
        trusted_proxies=PROXY,
        agent_auth_failures_per_minute=5,
        agent_auth_lockout=300.0,
    )
    guesser, neighbour = "203.0.113.7", "198.51.100.20"
    for attempt in range(5):
        method, path = AGENT_ROUTES[attempt % len(AGENT_ROUTES)]
        status, body, _ = await rest(http, server.url + path, f"guess-{attempt:04d}-xyz", guesser, method)
        assert (status, body["error"]["code"]) == (401, "unauthorized"), attempt
    for key in ("guess-0005-xyz", AGENT_KEY, None):  # the right key from the locked-out address is refused too
        status, body, retry_after = await rest(http, server.url + "/api/v1/tickets", key, guesser)
        assert (status, body["error"]["code"]) == (429, "rate_limited"), key
        assert retry_after is not None and 290 <= int(retry_after) <= 300
    # Everyone else is untouched, and the lock is in Redis with the lockout as its lifetime.
    assert (await rest(http, server.url + "/api/v1/tickets", AGENT_KEY, neighbour))[0] == 200
    locks = [k for k in redis_sync.keys("*authfail:lock:*")]
    assert len(locks) == 1 and guesser in locks[0].decode() and 290 <= redis_sync.ttl(locks[0]) <= 300


async def test_a_burst_of_parallel_guesses_gets_no_more_verdicts_than_the_limit(start_server, http) -> None:
    server = await start_server(agent_api_keys=(("lee", Secret(AGENT_KEY)),), agent_auth_failures_per_minute=5)
    keys = [f"burst-guess-{n:04d}-q" for n in range(40)] + [AGENT_KEY]
    answers = await asyncio.gather(*(rest(http, server.url + "/api/v1/tickets", key) for key in keys))
    statuses = [status for status, _, _ in answers]
    # Exactly five wrong keys were judged; everything after the lock (the right key too, if it came late) is 429.
    assert statuses.count(401) == 5 and statuses.count(429) + statuses.count(200) == 36, statuses
    assert statuses.count(200) <= 1


async def test_forwarded_for_from_an_untrusted_peer_does_not_dodge_the_lockout(start_server, http) -> None:
    server = await start_server(agent_api_keys=(("lee", Secret(AGENT_KEY)),), agent_auth_failures_per_minute=3)
    for attempt in range(3):
        assert (await rest(http, server.url + "/api/v1/tickets", "wrong-key-000000", f"192.0.2.{attempt}"))[0] == 401
    status, body, _ = await rest(http, server.url + "/api/v1/tickets", AGENT_KEY, "192.0.2.99")
    assert (status, body["error"]["code"]) == (429, "rate_limited")


async def test_socket_guessing_is_refused_with_rate_limited_and_retry_after(start_server, http) -> None:
    server = await start_server(
        agent_api_keys=(("lee", Secret(AGENT_KEY)),), trusted_proxies=PROXY, agent_auth_failures_per_minute=4
    )
    guesser = "203.0.113.9"
    for attempt in range(4):
        outcome, data = await agent_connect(http, server.url, f"guess-{attempt:04d}-abc", guesser)
        assert outcome == "refused" and data["code"] == "unauthorized", (attempt, data)
    for key in ("guess-0004-abc", AGENT_KEY):
        outcome, data = await agent_connect(http, server.url, key, guesser)
        assert outcome == "refused" and data["code"] == "rate_limited", (key, data)
        assert 290 <= data["retryAfter"] <= 300 and "message" in data
    # The lockout holds across the two edges: the same address is locked out of REST as well.
    assert (await rest(http, server.url + "/api/v1/tickets", AGENT_KEY, guesser))[0] == 429
    assert (await agent_connect(http, server.url, AGENT_KEY, "198.51.100.21"))[0] == "connected"


async def test_guesses_over_one_websocket_are_counted_too(start_server, http) -> None:
    server = await start_server(agent_api_keys=(("lee", Secret(AGENT_KEY)),), agent_auth_failures_per_minute=3)
    outcomes: list[str] = []
    ws = await http.session.ws_connect(f"{server.url}/socket.io/?EIO=4&transport=websocket")
    assert (await ws.receive_str(timeout=5)).startswith("0")
    for attempt in range(6):  # repeated namespace CONNECTs on one transport, as the review's probe sent them
        try:
            outcome, data = await agent_connect(http, server.url, f"guess-{attempt:04d}-def", ws=ws)
        except (TypeError, ConnectionError, aiohttp.ClientError, TimeoutError):
            outcomes.append("closed")  # a server that closes such a transport stops the guessing as well
            break
        outcomes.append(data.get("code", outcome))
    await ws.close()
    assert "connected" not in outcomes
    assert outcomes.count("unauthorized") <= 3 and outcomes[-1] in ("rate_limited", "closed"), outcomes
    assert (await agent_connect(http, server.url, AGENT_KEY))[1]["code"] == "rate_limited"


async def test_the_lockout_ends(start_server, http) -> None:
    server = await start_server(
        agent_api_keys=(("lee", Secret(AGENT_KEY)),), agent_auth_failures_per_minute=2, agent_auth_lockout=1.0
    )
    for _ in range(2):
        assert (await rest(http, server.url + "/api/v1/tickets", "wrong-key-000000"))[0] == 401
    assert (await rest(http, server.url + "/api/v1/tickets", AGENT_KEY))[0] == 429
    await asyncio.sleep(1.2)
    assert (await rest(http, server.url + "/api/v1/tickets", AGENT_KEY))[0] == 200
    assert (await agent_connect(http, server.url, AGENT_KEY))[0] == "connected"


async def test_many_addresses_guessing_trip_the_global_limit_but_agents_still_sign_in(start_server, http) -> None:
    server = await start_server(
        agent_api_keys=(("lee", Secret(AGENT_KEY)),),
        trusted_proxies=PROXY,
        agent_auth_failures_per_minute=10,
        agent_auth_global_failures_per_minute=6,
    )
    botnet = [f"203.0.113.{n}" for n in range(1, 7)]
    for ip in botnet:  # one guess each: no address comes near its own limit
        assert (await rest(http, server.url + "/api/v1/tickets", "wrong-key-000000", ip))[0] == 401
    for ip in botnet:  # every address that failed this minute is refused now, whatever it presents
        assert (await rest(http, server.url + "/api/v1/tickets", AGENT_KEY, ip))[0] == 429
        assert (await agent_connect(http, server.url, "wrong-key-111111", ip))[1]["code"] == "rate_limited"
    assert (await rest(http, server.url + "/api/v1/tickets", AGENT_KEY, "198.51.100.30"))[0] == 200
    assert (await agent_connect(http, server.url, AGENT_KEY, "198.51.100.31"))[0] == "connected"


async def test_metrics_token_guessing_is_throttled_too(start_server, http) -> None:
    server = await start_server(metrics_token=Secret(METRICS_KEY), agent_auth_failures_per_minute=3)
    for _ in range(3):
        assert (await rest(http, server.url + "/metrics", "wrong-token-0000"))[0] == 401
    status, body, retry_after = await rest(http, server.url + "/metrics", METRICS_KEY)
    assert (status, body["error"]["code"]) == (429, "rate_limited") and retry_after


async def test_every_failed_sign_in_is_logged_with_the_address_and_never_the_key(start_server, http) -> None:
    server = await start_server(
        agent_api_keys=(("lee", Secret(AGENT_KEY)),), trusted_proxies=PROXY, agent_auth_failures_per_minute=2
    )
    log_lines: list[str] = []  # added after start-up: the app's logging set-up replaces every sink
    sink = logger.add(lambda m: log_lines.append(str(m)), level="INFO", format="{level} {message}")
    try:
        assert (await rest(http, server.url + "/api/v1/tickets", "presented-guess-one", "203.0.113.40"))[0] == 401
        assert (await agent_connect(http, server.url, "presented-guess-two", "203.0.113.40"))[0] == "refused"
        assert (await agent_connect(http, server.url, AGENT_KEY, "203.0.113.40"))[1]["code"] == "rate_limited"
        assert (await rest(http, server.url + "/api/v1/tickets", AGENT_KEY, "203.0.113.40"))[0] == 429
    finally:
        logger.remove(sink)
    text = "\n".join(log_lines)
    failed = [line for line in log_lines if "auth failed" in line]
    assert len(failed) == 2, text
    assert "203.0.113.40" in failed[0] and "GET /api/v1/tickets" in failed[0]
    assert "203.0.113.40" in failed[1] and "socket /agents" in failed[1]
    assert any("auth lockout" in line and "203.0.113.40" in line for line in log_lines), text
    assert any("auth refused" in line and "203.0.113.40" in line for line in log_lines), text
    # The REST refusals reach the access log with their status (the error middleware used to swallow them).
    assert "http GET /api/v1/tickets -> 401" in text and "http GET /api/v1/tickets -> 429" in text
    for secret in ("presented-guess-one", "presented-guess-two", AGENT_KEY):
        assert secret not in text


@pytest.mark.parametrize(
    "raw",
    [
        "alex:alex-key-123",  # too short
        "alex:aaaaaaaaaaaaaaaaaaaaaaaa",  # one character
        "alex:abcdefghijklmnopqrstuv",  # one kind of character
        "alex:ab12ab12ab12ab12ab12",  # a few characters repeated
        "alex:Password-2024-Summer!",  # a guessable word
        "alex:alex-key-123-4567-89ab,sam:alex-key-123-4567-89ab",  # one key shared by two agents
    ],
)
def test_weak_agent_keys_are_refused_when_settings_are_read(raw: str) -> None:
    with pytest.raises(WeakAgentKeyError) as refused:
        parse_agent_keys(raw)
    assert "AGENT_API_KEYS" in str(refused.value) and "alex" in str(refused.value)
    assert raw.split(":")[1].split(",")[0] not in str(refused.value)


def test_strong_agent_keys_are_accepted() -> None:
    keys = parse_agent_keys("alex:alex-key-123-4567-89ab, sam:Zq3x_Vb9-kT1pLm8aW2e")
    assert [name for name, _ in keys] == ["alex", "sam"]


def test_a_weak_key_stops_the_app_even_when_settings_are_built_in_code(settings: Settings) -> None:
    import dataclasses

    with pytest.raises(WeakAgentKeyError):
        create_app(dataclasses.replace(settings, agent_api_keys=(("alex", Secret("alex-key-123")),)))


def test_the_server_process_does_not_start_with_a_weak_key(tmp_path: Path, redis_url: str) -> None:
    env = {
        **os.environ,
        "AGENT_API_KEYS": "alex:alex-key-123",
        "PORT": "0",
        "HOST": "127.0.0.1",
        "REDIS_URL": redis_url,
        "DATA_DIR": str(tmp_path),
        "AI_PROVIDERS": "local",
    }
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "run.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the server started (and kept serving) with a 12-character agent key")
    assert done.returncode != 0
    assert "agent 'alex'" in done.stderr and "at least 16" in done.stderr
    assert "alex-key-123" not in done.stderr
