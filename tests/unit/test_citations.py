"""An answer's citations become its sources: only entries the prompt listed, markers renumbered as footnotes; and the
prompt numbers exactly the entries a model may cite."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.ai.knowledge import KnowledgeEntry
from server.ai.retrieval import RankedEntry, Retrieval, Source, Verdict
from server.chat.citations import cite
from server.chat.prompt import PromptBuilder

RETURNS = KnowledgeEntry("returns", "returns", "How do I return an item?", "Start a return from your orders page.")
REFUNDS = KnowledgeEntry("refunds", "returns", "When will I get my refund?", "Within 5 business days.")
SHIPPING = KnowledgeEntry("shipping", "shipping", "How long does shipping take?", "3 to 5 days.")
RETRIEVED = (RETURNS, REFUNDS, SHIPPING)  # as the prompt numbered them: [1], [2], [3]


def test_a_cited_entry_is_a_source_and_its_marker_stays() -> None:
    cited = cite("Start a return from your orders page [1].", RETRIEVED)
    assert cited.sources == (Source.of(RETURNS),)
    assert cited.text == "Start a return from your orders page [1]."
    assert cited.unknown == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Return it [1][2].", "Return it [1][2]."),
        ("Return it [1, 2].", "Return it [1][2]."),
        ("Return it [1,2].", "Return it [1][2]."),
        ("Return it [1] and wait [2].", "Return it [1] and wait [2]."),
    ],
)
def test_adjacent_and_grouped_markers(text: str, expected: str) -> None:
    cited = cite(text, RETRIEVED)
    assert cited.sources == (Source.of(RETURNS), Source.of(REFUNDS))
    assert cited.text == expected


def test_markers_are_renumbered_in_order_of_first_citation() -> None:
    """In the stored message `[n]` is sources[n-1], whatever number the prompt gave the entry."""
    cited = cite("Shipping takes 3 to 5 days [3]; refunds follow [2]. See also [3].", RETRIEVED)
    assert cited.sources == (Source.of(SHIPPING), Source.of(REFUNDS))
    assert cited.text == "Shipping takes 3 to 5 days [1]; refunds follow [2]. See also [1]."


def test_an_entry_cited_twice_is_listed_once() -> None:
    cited = cite("Return it [1]. Really [1, 1].", RETRIEVED)
    assert cited.sources == (Source.of(RETURNS),)
    assert cited.text == "Return it [1]. Really [1]."


def test_a_citation_of_an_entry_not_in_the_prompt_is_dropped_and_reported() -> None:
    cited = cite("Return it [1]. Gift cards never expire [7].", RETRIEVED)
    assert cited.sources == (Source.of(RETURNS),)
    assert cited.text == "Return it [1]. Gift cards never expire."
    assert cited.unknown == (7,)


def test_zero_is_not_an_entry() -> None:
    cited = cite("Hello [0].", RETRIEVED)
    assert cited.sources == ()
    assert cited.unknown == (0,)
    assert cited.text == "Hello."


def test_a_group_keeps_its_known_numbers() -> None:
    cited = cite("Return it [2, 9].", RETRIEVED)
    assert cited.sources == (Source.of(REFUNDS),)
    assert cited.text == "Return it [1]."
    assert cited.unknown == (9,)


def test_nothing_listed_means_every_citation_is_unknown() -> None:
    """An off-topic message's prompt lists no entry, whatever the retrieval found."""
    cited = cite("Return it [1].", ())
    assert cited.sources == ()
    assert cited.unknown == (1,)


def test_no_citation_no_source() -> None:
    cited = cite("Start a return from your orders page.", RETRIEVED)
    assert cited.sources == ()
    assert cited.text == "Start a return from your orders page."


@pytest.mark.parametrize(
    "text",
    [
        "See [the returns page](https://example.com/returns).",
        "Order [12](https://example.com/o/12) shipped.",
        "Our [2024] catalogue.",
        "Press [x] to close.",
    ],
)
def test_brackets_that_are_not_citations_are_left_alone(text: str) -> None:
    cited = cite(text, RETRIEVED)
    assert cited.text == text
    assert cited.sources == ()
    assert cited.unknown == ()


def test_without_a_listing_nothing_is_known() -> None:
    cited = cite("Return it [1].", None)
    assert cited.text == "Return it [1]."
    assert cited.sources == ()
    assert cited.unknown == ()


def test_the_providers_own_sources_are_taken_as_they_are() -> None:
    """The offline provider knows which entry it answered with; its text carries no markers."""
    cited = cite("Start a return from your orders page.", RETRIEVED, (Source.of(RETURNS), Source.of(RETURNS)))
    assert cited.sources == (Source.of(RETURNS),)
    assert cited.text == "Start a return from your orders page."


class _Entries:
    """What the prompt builder reads of a retriever: the generation of its entries."""

    generation = 0


@pytest.mark.parametrize("verdict", [Verdict.ANSWER, Verdict.UNSURE])
def test_the_prompt_numbers_exactly_the_entries_a_model_may_cite(tmp_path: Path, verdict: Verdict) -> None:
    prompts = PromptBuilder(tmp_path / "none.md", _Entries(), store_name="Shop", tone="kind", top_k=2)
    retrieval = Retrieval(tuple(RankedEntry(e, 0.9 - i / 10) for i, e in enumerate(RETRIEVED)), verdict)
    assert prompts.listed(retrieval) == (RETURNS, REFUNDS)  # the first top_k of the matches
    prompt = prompts.system_prompt(retrieval)
    assert f"[1] Q: {RETURNS.question}" in prompt and f"[2] Q: {REFUNDS.question}" in prompt
    assert "[3]" not in prompt and SHIPPING.question not in prompt
    assert "cite" in prompt.lower()
    assert cite("Shipping takes 3 to 5 days [3].", prompts.listed(retrieval)).sources == ()


@pytest.mark.parametrize("verdict", [Verdict.OFF_TOPIC, Verdict.SMALL_TALK])
def test_an_off_topic_or_small_talk_prompt_lists_nothing_to_cite(tmp_path: Path, verdict: Verdict) -> None:
    prompts = PromptBuilder(tmp_path / "none.md", _Entries(), store_name="Shop", tone="kind", top_k=3)
    retrieval = Retrieval((RankedEntry(RETURNS, 0.2),), verdict)
    assert prompts.listed(retrieval) == ()
    assert "[1]" not in prompts.system_prompt(retrieval)
    assert cite("Return it [1].", prompts.listed(retrieval)).sources == ()
