"""Ranked search over the shipped knowledge base (SQLite FTS5 with bm25), with a 0..1 confidence per match.

Files are Markdown: `# Topic`, then one `## Question` heading per entry with its answer below, and an
optional `Keywords: a, b, c` line that adds search terms without being shown.

How a match is scored:

* coverage (0..1): the share of the query's content words that the entry contains, each word weighted by
  its rarity in the base (a smoothed idf), so a matched "klarna" counts for more than a matched "order",
  and a word no entry contains ("mars", "pizza") pulls the score down. A word found only in the answer,
  not in the question or keywords, earns ANSWER_ONLY_CREDIT of its weight.
* strength (0..1): FTS5's bm25 rank (question 3.0, answer 1.0, keywords 2.0) through x / (x + k),
  x = -bm25, which is monotonic in bm25 and saturates.

score = coverage * (0.6 + 0.4 * strength): an entry that contains none of the words scores 0, one that
contains all of them scores 0.6 to 1.0 depending on how strongly bm25 ranks it. Results come best first
by that score, bm25 breaking ties.
"""

from __future__ import annotations

import functools
import math
import re
import sqlite3
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from rapidfuzz import process
from rapidfuzz.distance import OSA

QUESTION_WEIGHT = 3.0
ANSWER_WEIGHT = 1.0
KEYWORDS_WEIGHT = 2.0
COVERAGE_FLOOR = 0.6
ANSWER_ONLY_CREDIT = 0.85
# x / (x + k): one rare word matched in a question (-bm25 ~ 8) gives 0.5, several give 0.7-0.8.
STRENGTH_HALF_POINT = 8.0
MAX_QUERY_TERMS = 32
MAX_TERM_CHARS = 40
CANDIDATES = 50
TOKENIZER = "porter unicode61 remove_diacritics 2"
SPELL_MIN_CHARS = 4  # shorter unknown words are left alone ("pc", "ok"): too many near neighbours
SPELL_LONG_CHARS = 8  # from this length two edits are forgiven ("furnature"), below it one ("oder", "parcle")
SPELL_MAX_WORDS = 8  # unknown words looked up per message, at most

_TOKEN = re.compile(r"[^\W_]+")
_HEADING = re.compile(r"^(#{1,2})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_KEYWORDS_LINE = re.compile(r"^[ \t]*keywords[ \t]*:(.*)$", re.MULTILINE | re.IGNORECASE)

STOP_WORDS = frozenset(
    """
    a about above after again all also am an and any are aren as at be because been before being below between both
    but by can cannot could couldn d did didn do does doesn doing don done down during each either else ever every
    few for from further get gets getting got had hadn has hasn have haven having he her here hers herself him himself
    his how i if in into is isn it its itself just ll m me might mine more most much must mustn my myself need needs
    near neither no nor not now of off oh ok okay on once only or other ought our ours ourselves out over own please
    pls plz re really s same shall shan she should shouldn so some such t than that thats the their theirs them
    themselves then there these they this those through to too under until up upon us ve very want wanted wants was
    wasn way we were weren what whats whether which while who whom whose will with within won would wouldn y yet you
    your yours yourself yourselves hi hello hey hiya howdy thanks thank thx cheers dear know like tell help question
    questions anyone someone something anything possible able many never come comes came coming go goes going went
    gone take takes took taken say says said see let lets thing things stuff wondering wonder trying tried try think
    thought remember maybe actually yes yeah sure well even since one last ago already yesterday today tonight
    week weeks month months year years nothing everything everyone guys
    """.split()
)


@dataclass(frozen=True, slots=True)
class KnowledgeEntry:
    """One question/answer pair an operator wrote."""

    id: str
    topic: str
    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class KnowledgeMatch:
    """An entry together with a 0..1 confidence that it answers the query."""

    entry: KnowledgeEntry
    score: float


def terms(text: str) -> list[str]:
    """The plain content words of free text: lowercased, stop words dropped, each once, in order of appearance."""
    normalized = unicodedata.normalize("NFKC", text).casefold()
    seen: dict[str, None] = {}
    for match in _TOKEN.finditer(normalized):
        word = match.group(0)
        if 1 < len(word) <= MAX_TERM_CHARS and word not in STOP_WORDS:
            seen.setdefault(word, None)
    return list(seen)


def parse_markdown(text: str, stem: str) -> tuple[str, list[tuple[str, str, str]]]:
    """Split one knowledge file into its topic and its (question, answer, keywords) triples."""
    topic = ""
    entries: list[tuple[str, str, str]] = []
    headings = list(_HEADING.finditer(text))
    for position, heading in enumerate(headings):
        level, title = heading.group(1), heading.group(2).strip()
        if level == "#":
            topic = topic or title
            continue
        end = headings[position + 1].start() if position + 1 < len(headings) else len(text)
        body = text[heading.end() : end]
        keywords = " ".join(line.replace(",", " ").strip() for line in _KEYWORDS_LINE.findall(body))
        answer = _KEYWORDS_LINE.sub("", body).strip()
        if title and answer:
            entries.append((title, answer, keywords))
    return topic or stem.replace("_", " ").replace("-", " ").title(), entries


def term_weight(document_frequency: int, total: int) -> float:
    """Smoothed idf of a query word: high for a rare or unknown word, near zero for one in every entry."""
    return math.log(1.0 + (total - document_frequency + 0.5) / (document_frequency + 0.5))


def strength_from_bm25(rank: float) -> float:
    """Map FTS5's bm25 (negative, lower is better) onto 0..1, monotonically: x / (x + k) with x = -bm25."""
    x = max(0.0, -float(rank))
    return x / (x + STRENGTH_HALF_POINT)


class KnowledgeBase:
    """Ranked search over the shipped knowledge base."""

    def __init__(self, entries: Sequence[KnowledgeEntry], keywords: Sequence[str] = ()) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(f"CREATE VIRTUAL TABLE kb USING fts5(question, answer, keywords, tokenize = '{TOKENIZER}')")
        self._db.execute("CREATE VIRTUAL TABLE kb_terms USING fts5vocab(kb, 'row')")
        # The entries only change on `reload`, so the rows holding a word are looked up once (every user message
        # searches the base for the prompt, and most words recur).
        self._rows = functools.lru_cache(maxsize=8192)(self._matching_rows)
        self._spelled = functools.lru_cache(maxsize=8192)(self._nearest_word)
        self.generation = 0  # bumped by every reload: what was derived from the entries is stale
        self._entries: tuple[KnowledgeEntry, ...] = ()
        self._keywords: tuple[str, ...] = ()
        self._vocabulary: list[str] = []
        self._vocabulary_set: frozenset[str] = frozenset()
        self._heads: frozenset[str] = frozenset()
        self._load(entries, keywords)

    def reload(self, entries: Sequence[KnowledgeEntry], keywords: Sequence[str] = ()) -> None:
        """Replace every entry (searches wait meanwhile); `generation` tells caches derived from the old ones."""
        with self._lock:
            self._db.execute("DELETE FROM kb")
            self._load(entries, keywords)
            self._rows.cache_clear()
            self._spelled.cache_clear()
            self.generation += 1

    def _load(self, entries: Sequence[KnowledgeEntry], keywords: Sequence[str]) -> None:
        self._entries = tuple(entries)
        extra = [*keywords, *([""] * max(0, len(self._entries) - len(keywords)))]
        self._keywords = tuple(extra[: len(self._entries)])
        self._db.executemany(
            "INSERT INTO kb(rowid, question, answer, keywords) VALUES (?, ?, ?, ?)",
            [(i, e.question, e.answer, f"{e.topic} {extra[i]}") for i, e in enumerate(self._entries)],
        )
        self._db.commit()
        # The first two letters of every indexed (stemmed) term. The porter stemmer only rewrites a word's end: the
        # stem of an ASCII word of five letters or more starts with the word's own first two (checked over 140,000
        # words), so a word whose first two letters start no term matches no entry, and is known without a query.
        self._heads = frozenset(term[:2] for (term,) in self._db.execute("SELECT term FROM kb_terms"))
        # The words the entries are written in, unstemmed: what a misspelt word of a question is corrected to.
        vocabulary = {w for i, e in enumerate(self._entries) for w in terms(f"{e.topic} {e.question} {e.answer} {extra[i]}")}
        self._vocabulary = sorted(w for w in vocabulary if w.isalpha())
        self._vocabulary_set = frozenset(self._vocabulary)

    @classmethod
    def from_directory(cls, path: Path, *, store_name: str = "Northwind Goods") -> KnowledgeBase:
        """Load every `*.md` file of a directory with `{store_name}` filled in; unreadable or empty files are skipped."""
        directory = Path(path)
        entries: list[KnowledgeEntry] = []
        keywords: list[str] = []
        files = sorted(directory.glob("*.md")) if directory.is_dir() else []
        if not files:
            logger.warning("knowledge base: no .md files in {}", directory)
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                logger.warning("knowledge base: skipped {} ({})", file.name, type(err).__name__)
                continue
            topic, parsed = parse_markdown(text.replace("{store_name}", store_name), file.stem)
            if not parsed:
                logger.warning("knowledge base: skipped {} (no '## ' question with an answer)", file.name)
            for index, (question, answer, extra) in enumerate(parsed, start=1):
                entries.append(KnowledgeEntry(f"{file.stem}-{index}", topic, question, answer))
                keywords.append(extra)
        return cls(entries, keywords)

    @property
    def entries(self) -> tuple[KnowledgeEntry, ...]:
        """Every loaded entry, in file order."""
        return self._entries

    @property
    def keywords(self) -> tuple[str, ...]:
        """Each entry's `Keywords:` line (space-separated), in entry order: extra text for embeddings too."""
        return self._keywords

    def __len__(self) -> int:
        return len(self._entries)

    def search(self, query: str, limit: int = 3) -> list[KnowledgeMatch]:
        """The best entries for a free-text query, best first; never raises on odd input."""
        return self.search_terms(terms(query if isinstance(query, str) else str(query))[:MAX_QUERY_TERMS], limit)

    def search_terms(self, words: Sequence[str], limit: int = 3) -> list[KnowledgeMatch]:
        """`search` for a query already split into its `terms` (at most MAX_QUERY_TERMS of them)."""
        if not words or not self._entries or limit < 1:
            return []
        try:
            with self._lock:
                return self._search(list(words), limit)
        except sqlite3.Error as err:  # defensive only: the engine sees nothing but quoted plain words
            logger.warning("knowledge base search failed: {}", err)
            return []

    def known_terms(self, query: str) -> tuple[str, ...]:
        """The query's words (as `search` takes them) that some entry holds, in order.

        The others change a match's score but never which entries match nor their order (a word no entry holds
        adds nothing to any entry's bm25, and scales every candidate's coverage alike). The retriever reads the
        share of a question's words the base knows as a sign of being in scope, and spelling skips known words.
        """
        words = terms(query if isinstance(query, str) else str(query))[:MAX_QUERY_TERMS]
        if not words or not self._entries:
            return ()
        heads = self._heads
        try:
            with self._lock:
                return tuple(
                    word
                    for word in words
                    if not (len(word) >= 5 and word.isascii() and word[:2] not in heads) and self._rows(_phrase(word))
                )
        except sqlite3.Error as err:  # as in search
            logger.warning("knowledge base search failed: {}", err)
            return ()

    def spelled(self, text: str) -> str:
        """The text with each word no entry holds replaced by the entries' closest word, if it is one typo away.

        One edit (insertion, deletion, substitution or swap of neighbours) for words under SPELL_LONG_CHARS
        letters, two from there: "wheres my oder" reads "wheres my order", "furnature" "furniture". Words the
        base knows, short words and words with no close neighbour are left as they are.
        """
        if not isinstance(text, str) or not self._vocabulary:
            return text if isinstance(text, str) else str(text)
        vocabulary = self._vocabulary_set
        unknown = [w for w in terms(text) if len(w) >= SPELL_MIN_CHARS and w.isalpha() and w not in vocabulary]
        unknown = [w for w in unknown[:MAX_QUERY_TERMS] if w not in self.known_terms(w)][:SPELL_MAX_WORDS]
        fixes = {w: fixed for w in unknown if (fixed := self._spelled(w)) is not None}
        if not fixes:
            return text
        return _TOKEN.sub(lambda m: fixes.get(m.group(0).casefold(), m.group(0)), unicodedata.normalize("NFKC", text))

    def _nearest_word(self, word: str) -> str | None:
        limit = 2 if len(word) >= SPELL_LONG_CHARS else 1
        found = process.extractOne(word, self._vocabulary, scorer=OSA.distance, score_cutoff=limit)
        return None if found is None else str(found[0])

    def _search(self, words: list[str], limit: int) -> list[KnowledgeMatch]:
        rows_with = {word: self._rows(_phrase(word)) for word in words}
        if not any(rows_with.values()):
            return []
        rows_headed = {word: self._rows("{question keywords} : " + _phrase(word)) for word in words}
        weight = {word: term_weight(len(rows), len(self._entries)) for word, rows in rows_with.items()}
        total_weight = sum(weight.values())
        candidates = self._db.execute(
            "SELECT rowid, bm25(kb, ?, ?, ?) AS rank FROM kb WHERE kb MATCH ? ORDER BY rank LIMIT ?",
            (QUESTION_WEIGHT, ANSWER_WEIGHT, KEYWORDS_WEIGHT, " OR ".join(_phrase(w) for w in words), CANDIDATES),
        ).fetchall()
        ranked: list[tuple[float, float, int]] = []
        for row, rank in candidates:
            found = sum(weight[w] * (1.0 if row in rows_headed[w] else ANSWER_ONLY_CREDIT) for w in words if row in rows_with[w])
            coverage = found / total_weight
            score = coverage * (COVERAGE_FLOOR + (1.0 - COVERAGE_FLOOR) * strength_from_bm25(rank))
            ranked.append((min(1.0, max(0.0, score)), rank, row))
        ranked.sort(key=lambda item: (-item[0], item[1]))
        return [KnowledgeMatch(self._entries[row], round(score, 3)) for score, _, row in ranked[:limit]]

    def _matching_rows(self, match: str) -> frozenset[int]:
        return frozenset(row for (row,) in self._db.execute("SELECT rowid FROM kb WHERE kb MATCH ?", (match,)))


def _phrase(word: str) -> str:
    """One FTS5 string literal: the word in double quotes, any quote doubled (terms never hold one)."""
    return '"' + word.replace('"', '""') + '"'
