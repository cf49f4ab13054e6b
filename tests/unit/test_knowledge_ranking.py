"""How the knowledge base ranks, on a tiny hand-written base (the shipped content has its own tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.ai.knowledge import (
    ANSWER_ONLY_CREDIT,
    COVERAGE_FLOOR,
    KnowledgeBase,
    KnowledgeEntry,
    parse_markdown,
    strength_from_bm25,
    term_weight,
    terms,
)

ENTRIES = (
    KnowledgeEntry("pay-1", "Payments", "Can I pay with Klarna?", "Yes, Klarna is offered at checkout for orders over 50 euros."),
    KnowledgeEntry("pay-2", "Payments", "Which cards do you accept?", "Visa, Mastercard and American Express."),
    KnowledgeEntry("ship-1", "Shipping", "How long does shipping take?", "Standard shipping takes three to five days."),
    KnowledgeEntry("ship-2", "Shipping", "Do you ship abroad?", "We ship to every country in the European Union."),
    KnowledgeEntry("ret-1", "Returns", "How do I return an order?", "Print the label from your account and drop the parcel off."),
)


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    """Five entries, no keywords."""
    return KnowledgeBase(ENTRIES)


def ids(kb: KnowledgeBase, query: str, limit: int = 3) -> list[str]:
    """The ids of the matches, best first."""
    return [match.entry.id for match in kb.search(query, limit)]


def test_terms_are_content_words_once_each_in_order() -> None:
    assert terms("How can I PAY with Klarna, Klarna please?") == ["pay", "klarna"]
    assert terms("Café  crème") == ["café", "crème"]
    assert terms("a I x 2 b") == []  # one-character words carry nothing
    assert terms("snake_case words") == ["snake", "case", "words"]


def test_a_rare_word_outweighs_a_common_one() -> None:
    total = 100
    assert term_weight(1, total) > term_weight(10, total) > term_weight(90, total) > 0
    assert term_weight(0, total) > term_weight(1, total)  # a word no entry has weighs most: it pulls coverage down


def test_strength_is_monotonic_in_bm25_and_saturates() -> None:
    assert strength_from_bm25(0.0) == 0.0
    assert strength_from_bm25(5.0) == 0.0  # a positive rank (never produced) is no evidence
    assert strength_from_bm25(-8.0) == pytest.approx(0.5)
    assert strength_from_bm25(-2.0) < strength_from_bm25(-8.0) < strength_from_bm25(-40.0) < 1.0


def test_the_entry_that_asks_the_question_comes_first(kb: KnowledgeBase) -> None:
    assert ids(kb, "pay by klarna")[0] == "pay-1"
    assert ids(kb, "how long is shipping")[0] == "ship-1"
    assert ids(kb, "ship to another country")[0] == "ship-2"


def test_scores_are_between_zero_and_one_best_first_and_limited(kb: KnowledgeBase) -> None:
    matches = kb.search("shipping abroad country", limit=2)
    assert len(matches) == 2
    assert all(0.0 <= m.score <= 1.0 for m in matches)
    assert matches[0].score >= matches[1].score
    assert kb.search("shipping", limit=0) == []


def test_a_word_in_the_question_counts_more_than_one_only_in_the_answer(kb: KnowledgeBase) -> None:
    in_question = kb.search("cards")[0]  # pay-2's question
    in_answer = kb.search("mastercard")[0]  # only pay-2's answer
    assert in_question.entry.id == in_answer.entry.id == "pay-2"
    assert in_answer.score < in_question.score
    assert in_answer.score <= ANSWER_ONLY_CREDIT


def test_a_full_match_never_scores_below_the_coverage_floor(kb: KnowledgeBase) -> None:
    assert kb.search("klarna")[0].score >= COVERAGE_FLOOR


def test_an_unknown_word_pulls_the_score_down(kb: KnowledgeBase) -> None:
    plain = kb.search("klarna")[0].score
    diluted = kb.search("klarna spaceship")[0].score
    assert diluted < plain / 2


def test_nothing_in_common_means_no_match(kb: KnowledgeBase) -> None:
    assert kb.search("pizza on mars") == []
    assert kb.search("") == [] and kb.search("what is the") == []


def test_stems_case_and_accents_do_not_matter(kb: KnowledgeBase) -> None:
    assert ids(kb, "RETURNING orders")[0] == "ret-1"
    assert ids(kb, "klárna")[0] == "pay-1"


def test_fts5_syntax_is_searched_as_plain_words(kb: KnowledgeBase) -> None:
    for query in ('klarna" OR "*', "NEAR(klarna pay)", "question:klarna", "klarna AND NOT OR", "^klarna"):
        assert ids(kb, query)[0] == "pay-1", query


def test_keywords_find_an_entry_without_being_shown() -> None:
    kb = KnowledgeBase(ENTRIES, keywords=("", "", "", "", "refund money back"))
    assert ids(kb, "money back")[0] == "ret-1"
    assert "money" not in kb.entries[4].answer


def test_an_empty_base_finds_nothing() -> None:
    assert KnowledgeBase(()).search("klarna") == []


def test_markdown_files_give_topic_questions_answers_and_keywords() -> None:
    topic, entries = parse_markdown(
        "# Gift cards\n\n## Do gift cards expire?\nNo. They never expire.\nKeywords: voucher, coupon\n\n## Empty?\n\n",
        "gift_cards",
    )
    assert topic == "Gift cards"
    assert entries == [("Do gift cards expire?", "No. They never expire.", "voucher  coupon")]
    assert parse_markdown("## Q?\nA.", "gift_cards")[0] == "Gift Cards"  # no `#` heading: the file name


def test_a_directory_fills_in_the_store_name(tmp_path: Path) -> None:
    (tmp_path / "about.md").write_text("# About\n\n## Who are you?\n{store_name} sells things. Since 1999.\n", encoding="utf-8")
    kb = KnowledgeBase.from_directory(tmp_path, store_name="Acme")
    assert [e.id for e in kb.entries] == ["about-1"]
    assert kb.entries[0].answer.startswith("Acme sells things")
