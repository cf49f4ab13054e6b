"""Ranked search over the shipped knowledge base (SQLite FTS5 with bm25)."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

_WORD = re.compile(r"\w+", re.UNICODE)
_KEYWORDS = re.compile(r"^Keywords:(.*)$", re.MULTILINE | re.IGNORECASE)
_STOP_WORDS = frozenset(
    "a an and are as at be by can could do does for from have how i if in is it its me my of on or our "
    "so that the their them there this to was we what when where which who why will with would you your "
    "please hi hello hey thanks thank many much until get got any some just also about still yet very".split()
)


@dataclass(frozen=True, slots=True)
class KnowledgeEntry:
    """One question/answer pair an operator wrote."""

    id: str
    topic: str
    question: str
    answer: str
    keywords: str = ""


@dataclass(frozen=True, slots=True)
class KnowledgeMatch:
    """An entry with a 0..1 confidence that it answers the query."""

    entry: KnowledgeEntry
    score: float


def terms(text: str) -> list[str]:
    """Plain lowercase content words; FTS operators and punctuation never reach the engine."""
    return [w for w in (m.group(0).lower() for m in _WORD.finditer(text)) if w not in _STOP_WORDS and len(w) > 1]


class KnowledgeBase:
    """Ranked search over the shipped knowledge base."""

    def __init__(self, entries: list[KnowledgeEntry]) -> None:
        self.entries = entries
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE kb USING fts5(question, answer, keywords, "
            "tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        self._db.executemany(
            "INSERT INTO kb(rowid, question, answer, keywords) VALUES (?, ?, ?, ?)",
            [(i, e.question, e.answer, f"{e.topic} {e.keywords}") for i, e in enumerate(entries)],
        )
        self._stems = [set(self._stemmed(f"{e.question} {e.answer} {e.topic} {e.keywords}")) for e in entries]

    @classmethod
    def from_directory(cls, path: Path, *, store_name: str = "Northwind Goods") -> KnowledgeBase:
        """Load every `*.md` file: `# Topic`, then `## Question` headings each followed by its answer."""
        entries: list[KnowledgeEntry] = []
        for file in sorted(Path(path).glob("*.md")) if Path(path).is_dir() else []:
            text = file.read_text(encoding="utf-8").replace("{store_name}", store_name)
            topic_match = re.search(r"^# (.+)$", text, re.MULTILINE)
            topic = topic_match.group(1).strip() if topic_match else file.stem
            for index, block in enumerate(re.split(r"^## ", text, flags=re.MULTILINE)[1:]):
                question, _, answer = block.partition("\n")
                keywords = " ".join(k.strip() for k in _KEYWORDS.findall(answer))
                answer = _KEYWORDS.sub("", answer).strip()
                if question.strip() and answer:
                    entries.append(
                        KnowledgeEntry(f"{file.stem}-{index}", topic, question.strip(), answer, keywords.replace(",", " "))
                    )
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def _stemmed(text: str) -> list[str]:
        return [_stem(t) for t in terms(text)]

    def search(self, query: str, limit: int = 3) -> list[KnowledgeMatch]:
        """The best entries for a free-text query, best first; never raises on odd input."""
        words = terms(query)
        if not words or not self.entries:
            return []
        match = " OR ".join('"' + w.replace('"', "") + '"' for w in words)
        rows = self._db.execute(
            "SELECT rowid, bm25(kb, 3.0, 1.0, 2.0) FROM kb WHERE kb MATCH ? ORDER BY 2 LIMIT ?",
            (match, max(1, limit)),
        ).fetchall()
        query_stems = {_stem(w) for w in words}
        results = []
        for rowid, rank in rows:
            coverage = len(query_stems & self._stems[rowid]) / len(query_stems)
            strength = -rank / (-rank + 4.0)
            results.append(KnowledgeMatch(self.entries[rowid], round(0.65 * coverage + 0.35 * strength, 3)))
        return sorted(results, key=lambda m: m.score, reverse=True)


def _stem(word: str) -> str:
    """A light suffix stripper so 'refunds' and 'refund' count as the same term in coverage."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word
