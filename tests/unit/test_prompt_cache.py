"""The system prompt's knowledge, cached per question as the knowledge base sees it: the same prompt, built once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from server.ai.knowledge import MAX_QUERY_TERMS, KnowledgeBase, KnowledgeEntry, _phrase, terms
from server.chat.prompt import PromptBuilder

ROOT = Path(__file__).resolve().parents[2]
KB_DIR = ROOT / "config" / "knowledge"
TEMPLATE = ROOT / "config" / "system_prompt.md"


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase.from_directory(KB_DIR)


def _uncached(kb: KnowledgeBase, message: str, top_k: int = 3) -> str:
    """The prompt as it was built before the cache: a search over every word of the message."""
    builder = PromptBuilder(TEMPLATE, kb, store_name="Northwind Goods", tone="friendly", top_k=top_k)
    return builder._build(tuple(terms(message)[:MAX_QUERY_TERMS])) if top_k > 0 else builder._build(())


def _questions(kb: KnowledgeBase) -> list[str]:
    rng = random.Random(5)
    vocabulary = [w for e in kb.entries for w in terms(f"{e.question} {e.answer}")]
    noise = ["[m1234]", "m12", "xxxxxxxxxxxxxxxx", "hello", "pizza", "mars", "zzyzx", "ordering", "Überweisung", "配送"]
    questions = [e.question for e in kb.entries]
    for _ in range(400):
        words = [rng.choice(vocabulary if rng.random() < 0.6 else noise) for _ in range(rng.randint(1, 12))]
        questions.append(" ".join(words) + rng.choice(["?", "!", "", " please"]))
    return questions


def test_the_cached_prompt_is_the_prompt_a_search_over_every_word_builds(kb: KnowledgeBase) -> None:
    builder = PromptBuilder(TEMPLATE, kb, store_name="Northwind Goods", tone="friendly", top_k=3)
    for question in _questions(kb) * 2:  # the second round comes from the cache
        assert builder.system_prompt(question) == _uncached(kb, question), question


def test_known_terms_skips_only_words_no_entry_holds(kb: KnowledgeBase) -> None:
    for question in _questions(kb):
        words = terms(question)[:MAX_QUERY_TERMS]
        assert kb.known_terms(question) == tuple(w for w in words if kb._rows(_phrase(w))), question


def test_spellings_of_one_question_share_a_prompt(kb: KnowledgeBase) -> None:
    builder = PromptBuilder(TEMPLATE, kb, store_name="Northwind Goods", tone="friendly", top_k=3)
    first = builder.system_prompt("Where is my order?")
    assert builder.system_prompt("where is my ORDER [m1234] xxxxxxxxxxxxxxxx") is first
    assert builder._prompts and len(builder._prompts) == 1


def test_a_reload_empties_the_cache() -> None:
    kb = KnowledgeBase([KnowledgeEntry("a-1", "Parcels", "Where is my parcel?", "It is on its way, we promise.")])
    builder = PromptBuilder(TEMPLATE, kb, store_name="S", tone="calm", top_k=3)
    assert "on its way" in builder.system_prompt("my parcel")
    kb.reload([KnowledgeEntry("a-1", "Parcels", "Where is my parcel?", "It was delivered yesterday, look again.")])
    prompt = builder.system_prompt("my parcel")
    assert "delivered yesterday" in prompt and "on its way" not in prompt
    assert kb.known_terms("parcel zzzzzz") == ("parcel",)
