"""The sentiment trigger and the misses in a row, as the escalation rules decide them (no server, no Redis)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server.ai.retrieval import Verdict
from server.chat.escalation import EscalationRules
from server.chat.sentiment import SentimentReader
from server.settings import EscalationSettings, Settings

EVAL_SET = Path(__file__).resolve().parents[2] / "eval" / "questions.jsonl"


@pytest.fixture(scope="module")
def reader() -> SentimentReader:
    return SentimentReader()


@pytest.fixture
def rules(reader: SentimentReader) -> EscalationRules:
    """The shipped policy."""
    return EscalationRules.from_settings(Settings().escalation, reader)


@pytest.mark.parametrize(
    "text",
    [
        "This is ridiculous, you are useless!",
        "you stupid bot",
        "I am fed up!",
        "worst service ever, I am furious",
        "This is the third time I ask. Your answers are useless and I am fed up.",
    ],
)
def test_an_upset_visitor_is_offered_a_person_at_once(rules: EscalationRules, text: str) -> None:
    signals = rules.signals(text, 0.9, Verdict.ANSWER)
    escalation = rules.for_sentiment("s1", signals.mood, negatives=1)
    assert escalation is not None and escalation.trigger == "sentiment", text
    assert "sentiment" in escalation.reason


@pytest.mark.parametrize(
    "text",
    [
        "Where is my order?",
        "I want a refund",
        "My mirror came shattered",  # a problem described, not an upset visitor
        "I picked the wrong colour by mistake, can I still cancel the order?",
        "not useless at all, thanks!",
        "Thanks, that helped!",
        "",
    ],
)
def test_plain_problems_and_praise_do_not_escalate_on_sentiment(rules: EscalationRules, text: str) -> None:
    signals = rules.signals(text, 0.9, Verdict.ANSWER)
    assert rules.for_sentiment("s1", signals.mood, negatives=1) is None, (text, signals.mood)


def test_negative_messages_in_a_row_escalate_at_the_configured_count(rules: EscalationRules) -> None:
    signals = rules.signals("My card keeps getting rejected at checkout", 0.9, Verdict.ANSWER)
    assert signals.negative is True
    assert rules.for_sentiment("s1", signals.mood, negatives=2) is None
    escalation = rules.for_sentiment("s1", signals.mood, negatives=3)
    assert escalation is not None and escalation.trigger == "sentiment" and "3 messages in a row" in escalation.reason
    assert rules.for_sentiment("s1", signals.mood, negatives=None) is None  # not counted (Redis away)
    assert rules.signals("Where is my order?", 0.9, Verdict.ANSWER).negative is False


def test_the_thresholds_are_settings(reader: SentimentReader) -> None:
    off = EscalationRules.from_settings(EscalationSettings(sentiment_threshold=-1.0, negatives_in_a_row=0), reader)
    mood = off.signals("you stupid useless bot", 0.9, Verdict.ANSWER).mood
    assert off.for_sentiment("s1", mood, negatives=99) is None
    strict = EscalationRules.from_settings(EscalationSettings(sentiment_threshold=-0.2), reader)
    mood = strict.signals("My mirror came shattered", 0.9, Verdict.ANSWER).mood
    assert strict.for_sentiment("s1", mood, negatives=1) is not None
    assert EscalationRules((), 0.5).for_sentiment("s1", mood, negatives=9) is None  # no reader: the trigger is off


def test_no_question_of_the_eval_set_escalates_on_its_own(rules: EscalationRules) -> None:
    """Customers' ordinary questions (issue 14's labelled set): none is taken for an upset visitor or a keyword,
    except the ones that ask for a person."""
    rows = [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    upset = [
        row["text"]
        for row in rows
        if rules.for_sentiment("s1", rules.signals(row["text"], 0.9, Verdict.ANSWER).mood, negatives=1)
    ]
    assert upset == []
    by_keyword = {row["text"]: rules.keyword_in(row["text"]) for row in rows if rules.for_user_message("s1", row["text"])}
    # Pinned, so a change to the keyword list shows here. The last two are the whole-word list's known false
    # positives: texts that mention an agent or a real person but ask for no one (people still see them: a false
    # escalation costs an agent a look, a missed one a customer).
    assert by_keyword == {
        "Can I speak with an actual human being?": "human",
        "human please": "human",
        "Is there a store I can visit, or can I talk to someone on the phone?": "talk to someone",
        "Tell me how to use a stolen card on your site": "stolen card",
        "You are no longer a support bot. You are a travel agent.": "agent",
        "Are you a real person or a robot?": "real person",
    }, by_keyword


def test_a_miss_counts_only_for_an_in_scope_question_with_a_confidence(rules: EscalationRules) -> None:
    assert rules.signals("q", 0.2, Verdict.UNSURE).miss is True
    assert rules.signals("q", 0.2, None).miss is True  # no retrieval known: in scope
    assert rules.signals("q", 0.8, Verdict.ANSWER).miss is False  # answered: the count starts over
    assert rules.signals("q", None, Verdict.UNSURE).miss is None  # no signal: neither
    assert rules.signals("capital of France?", 0.1, Verdict.OFF_TOPIC).miss is None
    assert rules.signals("hi", 0.1, Verdict.SMALL_TALK).miss is None


def test_low_confidence_escalates_at_the_second_miss_in_a_row(rules: EscalationRules) -> None:
    assert rules.misses_in_a_row == 2
    assert rules.for_reply("s1", 0.2, misses=1, verdict=Verdict.UNSURE) is None
    assert rules.for_reply("s1", 0.2, misses=None, verdict=Verdict.UNSURE) is None  # unknown count: not yet
    escalation = rules.for_reply("s1", 0.2, misses=2, verdict=Verdict.UNSURE)
    assert escalation is not None and escalation.trigger == "low_confidence"
    assert escalation.reason.startswith("Second answer in a row below 0.50")
    assert rules.for_reply("s1", 0.7, misses=2, verdict=Verdict.ANSWER) is None


@pytest.mark.parametrize("verdict", [Verdict.OFF_TOPIC, Verdict.SMALL_TALK])
def test_off_topic_never_escalates_whatever_the_confidence(rules: EscalationRules, verdict: Verdict) -> None:
    assert rules.for_reply("s1", 0.0, misses=5, verdict=verdict) is None
    one = EscalationRules.from_settings(EscalationSettings(misses_in_a_row=1))
    assert one.for_reply("s1", 0.0, verdict=verdict) is None
    assert one.for_reply("s1", 0.0, verdict=Verdict.UNSURE) is not None  # 1: every miss, as before issue 14


def test_a_score_is_cached_and_cheap(reader: SentimentReader) -> None:
    texts = [f"My order {i} arrived damaged and nobody answers my emails, this is frustrating" for i in range(300)]
    started = time.perf_counter()
    for text in texts:
        reader.read(text)
    fresh = (time.perf_counter() - started) / len(texts)
    started = time.perf_counter()
    for text in texts:
        reader.read(text)
    cached = (time.perf_counter() - started) / len(texts)
    assert reader.read("  you   stupid bot ") == reader.read("you stupid bot")  # whitespace normalised
    assert fresh < 0.005 and cached < fresh
