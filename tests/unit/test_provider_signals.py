"""What the providers read from an answer: confidence, token counts, Retry-After, and a secret-free failure reason."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from server.ai.providers.base import MAX_TOKEN_COUNT, ProviderError, confidence_from_logprobs, token_count
from server.ai.providers.errors import describe_failure, retry_after_from_headers


def test_confidence_is_the_exp_of_the_mean_logprob() -> None:
    assert confidence_from_logprobs([0.0, 0.0]) == 1.0
    assert confidence_from_logprobs([math.log(0.5)] * 3) == pytest.approx(0.5)
    assert confidence_from_logprobs([-0.1, -0.3]) == pytest.approx(math.exp(-0.2))


def test_no_logprobs_is_no_signal() -> None:
    assert confidence_from_logprobs([]) is None


def test_float_noise_just_above_zero_is_clamped_to_one() -> None:
    assert confidence_from_logprobs([0.0005]) == 1.0


@pytest.mark.parametrize("logprobs", [[0.5], [float("nan")], [float("-inf")], ["x"], [None]])
def test_malformed_logprobs_fail_the_provider(logprobs: list[object]) -> None:
    with pytest.raises(ProviderError, match="malformed answer"):
        confidence_from_logprobs(logprobs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "count"), [(None, 0), (0, 0), (42, 42), (42.0, 42), (MAX_TOKEN_COUNT, MAX_TOKEN_COUNT)])
def test_token_counts_are_whole_numbers(value: object, count: int) -> None:
    assert token_count(value) == count


@pytest.mark.parametrize("value", [True, "12", 1.5, float("inf"), -1, MAX_TOKEN_COUNT + 1])
def test_a_malformed_token_count_fails_the_provider(value: object) -> None:
    with pytest.raises(ProviderError, match="malformed answer"):
        token_count(value)


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_from_headers({"retry-after": "30"}) == 30.0
    assert retry_after_from_headers({"Retry-After": "1.5"}) == 1.5
    assert retry_after_from_headers({"retry-after": "-5"}) == 0.0
    later = format_datetime(datetime.now(tz=UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (retry_after_from_headers({"retry-after": later}) or 0) <= 120
    earlier = format_datetime(datetime.now(tz=UTC) - timedelta(seconds=120), usegmt=True)
    assert retry_after_from_headers({"retry-after": earlier}) == 0.0


@pytest.mark.parametrize("headers", [None, {}, {"retry-after": ""}, {"retry-after": "soon"}])
def test_no_usable_retry_after(headers: dict[str, str] | None) -> None:
    assert retry_after_from_headers(headers) is None


def test_failure_reasons_name_the_error_type_never_its_text() -> None:
    class APITimeoutError(Exception):
        pass

    class APIConnectionError(Exception):
        pass

    assert describe_failure(TimeoutError("https://api.example/?key=sk-123")) == "timeout"
    assert describe_failure(APITimeoutError("sk-123")) == "timeout"
    assert describe_failure(APIConnectionError("sk-123")) == "connection error"
    assert describe_failure(ValueError("sk-123 leaked")) == "ValueError"
