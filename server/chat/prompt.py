"""The system prompt: an operator-editable file plus the knowledge entries that fit the question."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from server.ai.knowledge import KnowledgeBase

_FALLBACK_TEMPLATE = (
    "You are the customer-support assistant of {store_name}. Your tone is {tone}. "
    "Answer briefly and offer a human when you cannot help.\n\n{knowledge}"
)
PROMPTS_KEPT = 2048  # system prompts remembered, by the knowledge base's words of the question


class PromptBuilder:
    """Fills the operator's template with the store's name, tone and retrieved knowledge.

    Questions come back in many spellings of a few words ("Where is my order?", "where's my order"): the prompt
    is built once per question as the knowledge base sees it (its known words, `KnowledgeBase.known_terms`),
    and kept in a bounded LRU that a knowledge base reload empties.
    """

    def __init__(self, template_path: Path, knowledge: KnowledgeBase, *, store_name: str, tone: str, top_k: int) -> None:
        try:
            template = template_path.read_text(encoding="utf-8")
        except OSError:
            template = _FALLBACK_TEMPLATE
        self._template = template.replace("{store_name}", store_name).replace("{tone}", tone)
        self._knowledge = knowledge
        self._top_k = top_k
        self._prompts: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._generation = knowledge.generation

    def system_prompt(self, message: str) -> str:
        """The prompt for one user message, with the best few knowledge entries clearly delimited."""
        key = self._knowledge.known_terms(message) if self._top_k > 0 else ()
        if self._generation != self._knowledge.generation:
            self._prompts.clear()
            self._generation = self._knowledge.generation
        prompt = self._prompts.get(key)
        if prompt is not None:
            self._prompts.move_to_end(key)
            return prompt
        prompt = self._prompts[key] = self._build(key)
        if len(self._prompts) > PROMPTS_KEPT:
            self._prompts.popitem(last=False)
        return prompt

    def _build(self, words: tuple[str, ...]) -> str:
        matches = self._knowledge.search_terms(words, limit=self._top_k) if words else []
        if matches:
            entries = "\n\n".join(f"[{i}] Q: {m.entry.question}\nA: {m.entry.answer}" for i, m in enumerate(matches, start=1))
            block = (
                "<knowledge_base>\n"
                "Excerpts from the store's knowledge base that may answer this message. Prefer them; if they do "
                "not cover the question, say so.\n\n"
                f"{entries}\n"
                "</knowledge_base>"
            )
        else:
            block = (
                "<knowledge_base>\nNo knowledge base entry matches this message: say you are not sure and offer "
                "a person from the support team if you cannot help.\n</knowledge_base>"
            )
        return self._template.replace("{knowledge}", block).strip()
