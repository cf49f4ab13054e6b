"""The system prompt: an operator-editable file plus the knowledge entries that fit the question."""

from __future__ import annotations

from pathlib import Path

from server.ai.knowledge import KnowledgeBase

_FALLBACK_TEMPLATE = (
    "You are the customer-support assistant of {store_name}. Your tone is {tone}. "
    "Answer briefly and offer a human when you cannot help.\n\n{knowledge}"
)


class PromptBuilder:
    """Fills the operator's template with the store's name, tone and retrieved knowledge."""

    def __init__(self, template_path: Path, knowledge: KnowledgeBase, *, store_name: str, tone: str, top_k: int) -> None:
        try:
            template = template_path.read_text(encoding="utf-8")
        except OSError:
            template = _FALLBACK_TEMPLATE
        self._template = template.replace("{store_name}", store_name).replace("{tone}", tone)
        self._knowledge = knowledge
        self._top_k = top_k

    def system_prompt(self, message: str) -> str:
        """The prompt for one user message, with the best few knowledge entries clearly delimited."""
        matches = self._knowledge.search(message, limit=self._top_k) if self._top_k > 0 else []
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
