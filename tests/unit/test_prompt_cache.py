"""The system prompt, built from the message's retrieval and cached per (entries shown, verdict)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.ai.hybrid import HybridRetriever, offline_retriever
from server.ai.knowledge import KnowledgeBase, KnowledgeEntry
from server.ai.retrieval import RankedEntry, Retrieval, Verdict
from server.chat.prompt import PromptBuilder

ROOT = Path(__file__).resolve().parents[2]
KB_DIR = ROOT / "config" / "knowledge"
TEMPLATE = ROOT / "config" / "system_prompt.md"


@pytest.fixture(scope="module")
def retriever() -> HybridRetriever:
    return offline_retriever(KnowledgeBase.from_directory(KB_DIR))


def builder(retriever: HybridRetriever, top_k: int = 3) -> PromptBuilder:
    return PromptBuilder(TEMPLATE, retriever, store_name="Northwind Goods", tone="friendly", top_k=top_k)


@pytest.mark.asyncio
async def test_the_prompt_numbers_the_retrieved_entries(retriever: HybridRetriever) -> None:
    retrieval = await retriever.retrieve("Do you sell gift cards?")
    prompt = builder(retriever).system_prompt(retrieval)
    for number, match in enumerate(retrieval.matches, start=1):
        assert f"[{number}] Q: {match.entry.question}\nA: {match.entry.answer}" in prompt
    assert "Northwind Goods" in prompt and "{knowledge}" not in prompt


@pytest.mark.asyncio
async def test_spellings_of_one_question_share_a_prompt(retriever: HybridRetriever) -> None:
    prompts = builder(retriever)
    first = prompts.system_prompt(await retriever.retrieve("Where is my order?"))
    assert prompts.system_prompt(await retriever.retrieve("where is my ORDER")) is first
    assert len(prompts._prompts) == 1


@pytest.mark.asyncio
async def test_off_topic_and_small_talk_prompts_ask_for_a_scope_answer(retriever: HybridRetriever) -> None:
    prompts = builder(retriever)
    off_topic = await retriever.retrieve("What is the capital of France?")
    assert off_topic.verdict == Verdict.OFF_TOPIC
    prompt = prompts.system_prompt(off_topic)
    assert "outside what the store's customer support covers" in prompt and "[1] Q:" not in prompt
    assert "orders, shipping, returns" in prompt
    greeting = prompts.system_prompt(await retriever.retrieve("hello!"))
    assert "greeting" in greeting and "[1] Q:" not in greeting


def test_unsure_prompts_say_so_and_nothing_found_offers_a_person(retriever: HybridRetriever) -> None:
    entry = retriever.knowledge.entries[0]
    prompts = builder(retriever)
    unsure = prompts.system_prompt(Retrieval((RankedEntry(entry, 0.2),), Verdict.UNSURE))
    assert "None of them is a sure match" in unsure and f"[1] Q: {entry.question}" in unsure
    assert "No knowledge base entry matches" in prompts.system_prompt(Retrieval((), Verdict.UNSURE))


@pytest.mark.asyncio
async def test_top_k_limits_the_entries_shown(retriever: HybridRetriever) -> None:
    retrieval = await retriever.retrieve("how do I return an item")
    assert "[2] Q:" not in builder(retriever, top_k=1).system_prompt(retrieval)
    assert "[1] Q:" not in builder(retriever, top_k=0).system_prompt(retrieval)


@pytest.mark.asyncio
async def test_a_reload_empties_the_caches() -> None:
    kb = KnowledgeBase([KnowledgeEntry("a-1", "Parcels", "Where is my parcel?", "It is on its way, we promise.")])
    retriever = offline_retriever(kb)
    prompts = PromptBuilder(TEMPLATE, retriever, store_name="S", tone="calm", top_k=3)
    assert "on its way" in prompts.system_prompt(await retriever.retrieve("where is my parcel"))
    kb.reload([KnowledgeEntry("a-1", "Parcels", "Where is my parcel?", "It was delivered yesterday, look again.")])
    prompt = prompts.system_prompt(await retriever.retrieve("where is my parcel"))
    assert "delivered yesterday" in prompt and "on its way" not in prompt
    assert retriever.generation == kb.generation == 1
