"""The visitor's language, offline: confident detections only, and the sentences said in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.chat.language import LanguageDetection
from server.chat.translations import LANGUAGE_NAMES, OFFLINE_NOTES, answer_in, offline_note
from server.settings import Settings

EVAL_SET = Path(__file__).resolve().parents[2] / "eval" / "questions.jsonl"


@pytest.fixture(scope="module")
def detection() -> LanguageDetection:
    s = Settings()
    return LanguageDetection(s.languages, min_confidence=s.language_min_confidence, min_margin=s.language_min_margin)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("¿Dónde está mi pedido? Lo compré hace dos semanas.", "es"),
        ("Wo ist meine Bestellung?", "de"),
        ("Où est ma commande ? Je l'attends depuis lundi.", "fr"),
        ("Dov'è il mio ordine?", "it"),
        ("Onde está o meu pedido? Comprei há duas semanas.", "pt"),
        ("Waar is mijn bestelling?", "nl"),
        ("I want to return a lamp I bought two weeks ago. How do I do that?", "en"),
    ],
)
def test_languages_are_told_apart(detection: LanguageDetection, text: str, code: str) -> None:
    assert detection.detect(text) == code


@pytest.mark.parametrize("text", ["ok", "hi", "refund", "order 1234", "12345", "!!!", ""])
def test_short_or_unclear_messages_keep_the_sessions_language(detection: LanguageDetection, text: str) -> None:
    assert detection.detect(text) in (None, "en")


def test_english_customer_questions_are_never_taken_for_another_language(detection: LanguageDetection) -> None:
    rows = [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    wrong = [(row["text"], found) for row in rows if (found := detection.detect(row["text"])) not in (None, "en")]
    assert wrong == []


def test_no_languages_no_detection() -> None:
    assert LanguageDetection(("en",), min_confidence=0.6, min_margin=0.35).detect("¿Dónde está mi pedido?") is None
    with pytest.raises(ValueError):
        LanguageDetection(("en", "xx"), min_confidence=0.6, min_margin=0.35)


def test_every_detectable_language_has_its_sentences() -> None:
    for code in Settings().languages:
        assert code in LANGUAGE_NAMES
        assert code == "en" or code in OFFLINE_NOTES
    assert answer_in("es") == "The visitor writes in Spanish. Answer in Spanish."
    assert answer_in("en") is None and answer_in(None) is None and answer_in("xx") is None
    assert offline_note("en") is None and "inglés" in (offline_note("es") or "")
