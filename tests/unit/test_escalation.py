"""Escalation rules: which of the contract's triggers fires, on what text or confidence, and what clients see."""

from __future__ import annotations

import pytest

from server.chat.escalation import EscalationRules
from server.settings import DEFAULT_KEYWORDS


@pytest.fixture
def rules() -> EscalationRules:
    """The shipped keywords and the contract's default confidence threshold."""
    return EscalationRules(DEFAULT_KEYWORDS, 0.5)


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("I want a LAWYER", "lawyer"),
        ("This is fraud.", "fraud"),
        ("can I speak to a person please", "speak to a person"),
        ("let me SPEAK   TO\ta   Person", "speak to a person"),  # any run of whitespace between the words
        ("(manager)", "manager"),
        ("human?", "human"),
    ],
)
def test_keywords_match_as_whole_words_in_any_case(rules: EscalationRules, text: str, keyword: str) -> None:
    assert rules.keyword_in(text) == keyword


@pytest.mark.parametrize(
    "text",
    [
        "Where is my order?",
        "I want a refund.",  # ordinary support words are answered, not escalated (issue 14)
        "This is URGENT, where is my return label?",
        "I have a complaint about my delivery",
        "humane treatment of animals",  # "human" inside a longer word
        "the agency sent it",  # "agent" inside a longer word
        "refunds_policy",  # joined by an underscore: one word
        "speak to a",
        "",
    ],
)
def test_no_keyword_no_escalation(rules: EscalationRules, text: str) -> None:
    assert rules.keyword_in(text) is None
    assert rules.for_user_message("s1", text) is None


def test_the_first_configured_keyword_wins(rules: EscalationRules) -> None:
    assert rules.keyword_in("fraud! a manager, a human") == "human"  # DEFAULT_KEYWORDS order, not text order


def test_a_keyword_escalates_with_a_reason_naming_it(rules: EscalationRules) -> None:
    escalation = rules.for_user_message("s1", "I need a LAWYER")
    assert escalation is not None
    assert (escalation.session_id, escalation.trigger) == ("s1", "keyword")
    assert "lawyer" in escalation.reason


def test_blank_keywords_are_ignored_and_regex_characters_are_literal() -> None:
    rules = EscalationRules(("", "   ", "c++", "a.b"), 0.5)
    assert rules.keyword_in("anything at all") is None
    assert rules.keyword_in("I write c++ code") == "c++"
    assert rules.keyword_in("axb") is None
    assert rules.keyword_in("see a.b now") == "a.b"


@pytest.mark.parametrize(("confidence", "escalates"), [(0.49, True), (0.0, True), (0.5, False), (0.93, False), (None, False)])
def test_low_confidence_is_strictly_below_the_threshold_and_no_signal_never_counts(
    rules: EscalationRules, confidence: float | None, escalates: bool
) -> None:
    escalation = rules.for_reply("s1", confidence)
    assert (escalation is not None) is escalates
    if escalation is not None:
        assert escalation.trigger == "low_confidence"
        assert f"{confidence:.2f}" in escalation.reason and "0.50" in escalation.reason


def test_a_zero_threshold_never_escalates_on_confidence() -> None:
    assert EscalationRules((), 0.0).for_reply("s1", 0.0) is None


def test_failure_and_user_request_carry_their_trigger_and_a_default_reason() -> None:
    failure = EscalationRules.for_failure("s1")
    assert (failure.trigger, failure.reason) == ("error", "Every AI provider failed.")
    assert EscalationRules.for_failure("s1", "Budget spent.").reason == "Budget spent."
    asked = EscalationRules.for_user_request("s1", None)
    assert (asked.trigger, asked.reason) == ("user_request", "The visitor asked for a human.")
    assert EscalationRules.for_user_request("s1", "Billing question").reason == "Billing question"
    assert EscalationRules.for_user_request("s1", "").reason == "The visitor asked for a human."


def test_clients_receive_the_contract_shape(rules: EscalationRules) -> None:
    escalation = rules.for_user_message("s-42", "fraud!")
    assert escalation is not None
    sent = escalation.to_dict()
    assert set(sent) == {"sessionId", "trigger", "reason", "createdAt"}
    assert sent["sessionId"] == "s-42" and sent["trigger"] == "keyword"
    assert sent["createdAt"].endswith("Z") and "T" in sent["createdAt"]


def test_a_model_score_decides_upset_now_and_the_negatives_in_a_row_still_count() -> None:
    from server.chat.sentiment import Mood, SentimentReader
    from server.contract import Trigger

    rules = EscalationRules((), 0.5, sentiment=SentimentReader(), sentiment_threshold=-0.8, negatives_in_a_row=3)
    calm, angry = Mood(0.0, False), Mood(-0.9, True)
    upset_now = rules.for_sentiment("s1", calm, 1, 0.8)  # at the threshold (0.8 by default): at once
    assert upset_now is not None and upset_now.trigger == Trigger.SENTIMENT
    assert "sentiment model" in upset_now.reason and "0.8" not in upset_now.reason  # the score stays in the server
    assert rules.for_sentiment("s1", angry, 1, 0.79) is None  # the model read it calm: the lexicon does not decide
    assert rules.for_sentiment("s1", angry, 1, None) is not None  # no score (failure, timeout): the lexicon decides
    repeated = rules.for_sentiment("s1", calm, 3, 0.1)
    assert repeated is not None and "last 3 messages in a row" in repeated.reason
