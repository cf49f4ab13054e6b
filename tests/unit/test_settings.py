"""Settings as operators write them: environment variables and `.env`, parsed once into one typed object."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.settings import (
    DEFAULT_KEYWORDS,
    Secret,
    Settings,
    WeakAgentKeyError,
    parse_agent_keys,
    weak_key_reason,
)

GOOD_KEY = "lee-key-8d41-77c2-b09e"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An empty environment (whatever the shell running the tests exports), to set variables on."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    return monkeypatch


def test_no_variables_give_the_contracts_defaults(env: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env(None)
    assert settings == Settings()
    assert settings.port == 3000 and settings.ai_providers == ("openai", "gemini", "local")
    assert settings.escalation_keywords == DEFAULT_KEYWORDS
    assert settings.redis_url is None and settings.redis_mode == "embedded" and not settings.scaled_out


def test_numbers_flags_and_lists_are_parsed(env: pytest.MonkeyPatch) -> None:
    env.setenv("PORT", "8081")
    env.setenv("AI_REQUEST_TIMEOUT", "12.5")
    env.setenv("WS_COMPRESSION", "true")
    env.setenv("AI_PROVIDERS", " Gemini , LOCAL,, ")
    env.setenv("ESCALATION_KEYWORDS", "Refund, Speak To A Person ,")
    env.setenv("CORS_ORIGINS", "https://a.example, https://b.example")
    env.setenv("LOG_LEVEL", "debug")
    env.setenv("LOG_FORMAT", "JSON")
    settings = Settings.from_env(None)
    assert settings.port == 8081 and settings.ai_request_timeout == 12.5 and settings.ws_compression is True
    assert settings.ai_providers == ("gemini", "local")
    assert settings.escalation_keywords == ("refund", "speak to a person")
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")


def test_the_sentiment_model_settings(env: pytest.MonkeyPatch) -> None:
    assert Settings.from_env(None).sentiment_model == "lexicon"
    env.setenv("SENTIMENT_MODEL", " Provider ")
    env.setenv("SENTIMENT_MODEL_TIMEOUT", "1.5")
    env.setenv("SENTIMENT_MODEL_THRESHOLD", "0.7")
    settings = Settings.from_env(None)
    assert (settings.sentiment_model, settings.sentiment_model_timeout) == ("provider", 1.5)
    assert settings.escalation.model_threshold == 0.7


def test_a_malformed_number_stops_the_start(env: pytest.MonkeyPatch) -> None:
    env.setenv("PORT", "eighty")
    with pytest.raises(Exception, match="PORT"):
        Settings.from_env(None)


def test_redis_url_wins_over_its_parts(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://cache:6380/2")
    env.setenv("REDIS_HOST", "ignored")
    settings = Settings.from_env(None)
    assert settings.redis_url == "redis://cache:6380/2"
    assert settings.redis_mode == "external" and settings.scaled_out


def test_redis_parts_build_a_url(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_HOST", "cache.internal")
    assert Settings.from_env(None).redis_url == "redis://cache.internal:6379/0"
    env.setenv("REDIS_PORT", "6380")
    env.setenv("REDIS_DB", "3")
    env.setenv("REDIS_PASSWORD", "s3cret")
    assert Settings.from_env(None).redis_url == "redis://:s3cret@cache.internal:6380/3"


def test_an_empty_redis_url_means_embedded(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "")
    env.setenv("REDIS_HOST", "")
    assert Settings.from_env(None).redis_mode == "embedded"


def test_the_memory_manager_keeps_one_process_even_on_external_redis(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://cache:6379/0")
    env.setenv("SOCKETIO_MANAGER", "MEMORY")
    assert not Settings.from_env(None).scaled_out


def test_dot_env_is_read_and_the_environment_wins(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dot_env = tmp_path / ".env"
    dot_env.write_text("PORT=4000\nSTORE_NAME=Acme Outfitters\n", encoding="utf-8")
    env.setenv("PORT", "5000")
    settings = Settings.from_env(dot_env)
    assert settings.port == 5000 and settings.store_name == "Acme Outfitters"


def test_a_missing_dot_env_is_fine(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Settings.from_env(tmp_path / "absent.env").port == 3000


def test_session_timeout_is_milliseconds_and_ttls_round_up_to_whole_seconds() -> None:
    assert Settings(session_timeout_ms=1_800_000).session_ttl_seconds == 1800
    assert Settings(session_timeout_ms=1500).session_ttl_seconds == 2
    assert Settings(session_timeout_ms=1).session_ttl_seconds == 1
    assert Settings(session_timeout_ms=0).session_ttl_seconds == 1


# --- secrets and agent keys ------------------------------------------------------------------------------


def test_secrets_never_show_their_value(env: pytest.MonkeyPatch) -> None:
    env.setenv("OPENAI_API_KEY", "sk-live-abcdef")
    env.setenv("METRICS_TOKEN", "scrape-me")
    settings = Settings.from_env(None)
    assert settings.openai_api_key.reveal() == "sk-live-abcdef"
    for text in (repr(settings), str(settings.openai_api_key), f"{settings.metrics_token}"):
        assert "sk-live" not in text and "scrape-me" not in text
    assert repr(Secret("x")) == "Secret('***')" and repr(Secret("")) == "Secret(None)"
    assert not Secret("") and not Secret(None) and Secret("x")
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b") and Secret("a") != "a"


def test_agent_keys_are_name_colon_key_pairs(env: pytest.MonkeyPatch) -> None:
    env.setenv("AGENT_API_KEYS", f" lee : {GOOD_KEY} , broken, :nameless, nokey: ,sam:sam-key-456-7890-cdef")
    keys = Settings.from_env(None).agent_api_keys
    assert [(name, key.reveal()) for name, key in keys] == [("lee", GOOD_KEY), ("sam", "sam-key-456-7890-cdef")]


def test_a_key_may_contain_colons() -> None:
    assert parse_agent_keys("lee:abc:def:ghi:1234-5678")[0][1].reveal() == "abc:def:ghi:1234-5678"


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("short-1", "characters"),
        ("abcdefghijklmnopqrst", "one kind"),
        ("ab12ab12ab12ab12ab12", "repeats"),
        ("my-Password-2024-xyz", "password"),
        ("key-123456-of-agent-x", "123456"),
    ],
)
def test_weak_agent_keys_are_refused_with_a_reason(key: str, why: str) -> None:
    reason = weak_key_reason(key)
    assert reason is not None and why in reason
    with pytest.raises(WeakAgentKeyError) as refused:
        parse_agent_keys(f"lee:{key}")
    assert "'lee'" in str(refused.value) and key not in str(refused.value)  # names the agent, never the key


def test_a_strong_key_passes() -> None:
    assert weak_key_reason(GOOD_KEY) is None


def test_two_agents_may_not_share_a_key() -> None:
    with pytest.raises(WeakAgentKeyError, match="share one key") as refused:
        parse_agent_keys(f"lee:{GOOD_KEY},sam:{GOOD_KEY}")
    assert GOOD_KEY not in str(refused.value)
