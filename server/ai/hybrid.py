"""The real Retriever: FTS5/bm25 and dense embeddings fused, then a calibrated confidence and a verdict.

Per question (cached per `cache_key` in a bounded LRU, emptied when the entries change):

1. Small talk (a greeting or a thank-you with nothing else), prompt injections ("ignore your instructions…") and
   requests for other people's data are recognised first: SMALL_TALK and OFF_TOPIC.
2. Spelling: a word no entry holds is read as the base's closest word when one typo away (`KnowledgeBase.spelled`).
3. Lexical: the knowledge base's FTS5 search (bm25 with query coverage, 0..1 per entry; server/ai/knowledge.py).
4. Dense: the question's unit vector times the matrix of the entries' unit vectors (one matrix product; at 10,000
   entries, two 256-float32 rows each, that is 20 MB and about a millisecond). Each entry has two rows, its
   question and its question with topic and keywords; an entry's similarity is the better of the two.
5. Fusion: a weighted sum, `w * lexical + (1 - w) * cosine` (or reciprocal rank fusion, `1/(k + rank)` summed),
   whichever ranked the TUNE split of eval/questions.jsonl best; `eval/calibrate.py` chooses and writes the
   choice into config/calibration.json. The weighted sum won (w = 0.35): RRF throws away how far apart the
   scores are, and both the ranking of close calls and the calibration need exactly that.
6. Calibration: two logistic regressions fitted on the tune split only (`eval/calibrate.py`): `answer` gives the
   probability that a candidate answers the question (lexical score, cosine, fused score, lead over the next
   candidate, share of the question's words the base knows, a name the base never mentions); its intercept is
   then shifted so that 0.5 sits where the tune split's answers at or above it were right at least 95% of the
   time. `scope` tells an in-scope question from an off-topic one, from the best scores, the same question-level
   features and `topical`: a linear score on the question's vector itself (one dot product) fitted to tell the
   tune split's in-scope questions and the entries' own texts from its off-topic ones.

Verdicts: OFF_TOPIC (an injection, or out of scope by the scope model), else ANSWER (best confidence >= 0.5),
else UNSURE; SMALL_TALK. docs/evaluation.md (Method) says why, with the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cachetools import LRUCache
from loguru import logger

from server.ai.embeddings import (
    Embedder,
    OpenAIEmbedder,
    VectorCache,
    Vectors,
    WordLlamaEmbedder,
    normalize_rows,
    offline_embedder,
)
from server.ai.http import ProviderHTTP
from server.ai.knowledge import CANDIDATES, MAX_QUERY_TERMS, KnowledgeBase, KnowledgeEntry, terms
from server.ai.retrieval import RankedEntry, Retrieval, Verdict
from server.settings import Settings

Mode = Literal["hybrid", "bm25", "dense"]
CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "config" / "calibration.json"
RESULTS_KEPT = 4096  # retrievals remembered, by normalised question and limit
DENSE_CANDIDATES = 10  # best entries by cosine that join the lexical candidates
ANSWER_FEATURES = ("lexical", "cosine", "fused", "lead", "known", "foreign")
SCOPE_FEATURES = ("lexical", "cosine", "fused", "known", "foreign", "topical")

_WORD = re.compile(r"[^\W_]+")
_DIGITS = re.compile(r"\d+")
_GREETINGS = frozenset("hi hello hey hiya howdy yo greetings morning afternoon evening good day".split())
_THANKS = frozenset("thanks thank thx ty cheers appreciated appreciate great perfect awesome".split())
# Words that may stand next to a greeting or a thank-you without making the message a question.
_SMALL_TALK = _GREETINGS | _THANKS | frozenset("team everyone folks all much lot bot assistant there so".split())
# Attempts to change the assistant's instructions or read them out: never answered from the knowledge base.
_INJECTION = re.compile(
    r"\b(ignore|disregard|forget|override)\b[^.?!]{0,40}\b(instructions?|rules|prompts?|guidelines|above|previous)\b"
    r"|\b(system|hidden|initial|original)\s+(prompt|instructions?|message)\b"
    r"|\b(you are|you're) (now|no longer)\b|\bfrom now on\b|\bact as\b|\bpretend (to be|you are)\b"
    r"|\bjailbreak|\bdeveloper mode\b|^\s*system\s*:|</?\s*knowledge|\bnew instructions?\b"
    r"|\b(repeat|print|reveal|output|show)\b[^.?!]{0,40}\b(text above|instructions|context window|prompt)\b"
    r"|\brole-?play\b|\bbypass (your|the|all) (rules|filters|restrictions|safety|guidelines)\b"
    r"|\bunfiltered\b|\bdo anything now\b|\bno (restrictions|rules|filters)\b"
    r"|\badmin(istrator)?\s+(mode|access|override|command)",
    re.IGNORECASE,
)
# Requests for other people's data or for help attacking the store: refused like injections, never searched.
_ABUSE = re.compile(
    r"\b(other|another|previous|last|all the|all)\s+(customers?|visitors?|users?|shoppers?)\b"
    r"|\bsomeone else'?s\b|\bperson who (placed|ordered|bought)\b|\bhack(ing)? into\b"
    r"|\b(how|help me) (do i|can i|to)? ?hack\b|\bmalware\b|\bsteal(s|ing)?\b"
    r"|\bphishing\b|\bsql injection\b|\bdump\b[^.?!]{0,30}\b(database|table|users|customers)\b"
    r"|\b(passwords?|card numbers?|addresses|emails?|phone numbers?) of (other|all|your)\b",
    re.IGNORECASE,
)


def normalise(message: str) -> str:
    """A text as it is embedded: its words, casefolded, single-spaced (punctuation and case don't matter)."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", message).casefold()))


def cache_key(message: str) -> str:
    """A question as the result cache keys it: `normalise`d, every number the same ("order 48213" and "order 5120"
    retrieve alike: order numbers, amounts and dates name no entry). Spellings that share a key share a result."""
    return _DIGITS.sub("#", normalise(message))


# Identifiers: order and tracking numbers ("NW-104233", "#5120"), amounts, dates. They name no entry, and their
# letters ("NW") would read as unknown words and names and make "Where is my order NW-104233?" look off-topic.
_IDENTIFIER = re.compile(r"(?<![^\W\d_])[A-Za-z]{0,5}[-#]?\d[\w./-]*")


def without_identifiers(text: str) -> str:
    """The question with its order numbers, amounts and dates taken out (see _IDENTIFIER)."""
    return _IDENTIFIER.sub(" ", text)


_NAME = re.compile(r"(?<![.!?:]\s)(?<!^)\b[A-Z][A-Za-z0-9]+\b")
# Capitalised words that name nothing: days, months, and the pronoun.
_COMMON_NAMES = frozenset(
    "i monday tuesday wednesday thursday friday saturday sunday january february march april may june july august"
    " september october november december".split()
)


def names(text: str) -> list[str]:
    """Capitalised words inside a sentence (not its first word): the names a question mentions."""
    return [m.group(0) for m in _NAME.finditer(text) if m.group(0).casefold() not in _COMMON_NAMES]


def small_talk(message: str) -> Literal["greeting", "thanks"] | None:
    """A greeting or a thank-you with no question in it (then no search is needed)."""
    words = [w.casefold() for w in _WORD.findall(message)]
    if not words or any(w not in _SMALL_TALK for w in terms(message)):
        return None
    if any(w in _THANKS for w in words):
        return "thanks"
    if any(w in _GREETINGS for w in words):
        return "greeting"
    return None


def injection(message: str) -> bool:
    """Whether the message tries to change or read out the assistant's instructions, or asks for others' data."""
    return _INJECTION.search(message) is not None or _ABUSE.search(message) is not None


@dataclass(frozen=True, slots=True)
class Logistic:
    """A fitted logistic regression: sigmoid(intercept + coef . features)."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float

    def __call__(self, values: dict[str, float]) -> float:
        z = self.intercept + sum(c * values[f] for f, c in zip(self.features, self.coef, strict=True))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Logistic:
        """From config/calibration.json."""
        return cls(tuple(data["features"]), tuple(float(c) for c in data["coef"]), float(data["intercept"]))

    def to_dict(self) -> dict[str, Any]:
        """For config/calibration.json."""
        return {"features": list(self.features), "coef": list(self.coef), "intercept": self.intercept}


@dataclass(frozen=True, slots=True)
class Calibration:
    """How scores are fused and turned into confidences, for one embedding model (config/calibration.json)."""

    embedder: str = "wordllama-l2_supercat-256"
    fusion: Literal["weighted", "rrf"] = "weighted"
    lexical_weight: float = 0.5  # weighted: fused = w * lexical + (1 - w) * cosine
    rrf_k: float = 60.0  # rrf: fused = sum of 1 / (k + rank)
    answer: Logistic = field(
        default_factory=lambda: Logistic(ANSWER_FEATURES, (4.0, 4.0, 0.0, 8.0, 2.0, -2.0), -9.0)  # a guess until fitted
    )
    scope: Logistic = field(default_factory=lambda: Logistic(SCOPE_FEATURES, (4.0, 6.0, 0.0, 4.0, -2.0, 0.0), -6.0))
    answer_threshold: float = 0.5
    scope_threshold: float = 0.5
    # The topic model: a linear score on the question's vector itself, fitted to tell the tune split's in-scope
    # questions and the entries' own texts from its off-topic questions (empty: no such model, the score is 0).
    topical_coef: tuple[float, ...] = ()
    topical_intercept: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    _topical: Vectors = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_topical", np.asarray(self.topical_coef, dtype=np.float32))

    def topical(self, query: Vectors | None) -> float:
        """The topic model's score of a (unit) question vector: > 0 reads like the knowledge base's questions."""
        if query is None or not self._topical.size or self._topical.size != query.size:
            return 0.0
        return float(self._topical @ query.reshape(-1)) + self.topical_intercept

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE, embedder: str | None = None, mode: Mode = "hybrid") -> Calibration:
        """The calibration fitted for `embedder` (default: the file's first) and `mode`, or a built-in guess."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            models = data["models"]
            entry = models.get(embedder) if embedder else next(iter(models.values()))
            if entry is None:
                logger.warning("calibration: none for {} in {}; using the offline model's", embedder, path.name)
                entry = next(iter(models.values()))
            return cls.from_dict(entry[mode])
        except (OSError, ValueError, KeyError, StopIteration, TypeError) as err:
            logger.warning("calibration: {} unusable ({}); confidences are uncalibrated", path, type(err).__name__)
            return cls()

    @staticmethod
    def fitted(path: Path, embedder: str) -> bool:
        """Whether the file holds a calibration fitted for this embedding model."""
        try:
            return embedder in json.loads(path.read_text(encoding="utf-8"))["models"]
        except (OSError, ValueError, KeyError, TypeError):
            return False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """One model's section of config/calibration.json."""
        return cls(
            embedder=str(data["embedder"]),
            fusion=data["fusion"]["method"],
            lexical_weight=float(data["fusion"].get("lexical_weight", 0.5)),
            rrf_k=float(data["fusion"].get("rrf_k", 60.0)),
            answer=Logistic.from_dict(data["answer"]),
            scope=Logistic.from_dict(data["scope"]),
            answer_threshold=float(data.get("answer_threshold", 0.5)),
            scope_threshold=float(data.get("scope_threshold", 0.5)),
            topical_coef=tuple(float(c) for c in data.get("topical", {}).get("coef", ())),
            topical_intercept=float(data.get("topical", {}).get("intercept", 0.0)),
            notes=dict(data.get("notes", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        """One model's section of config/calibration.json."""
        return {
            "embedder": self.embedder,
            "fusion": {"method": self.fusion, "lexical_weight": self.lexical_weight, "rrf_k": self.rrf_k},
            "answer": self.answer.to_dict(),
            "scope": self.scope.to_dict(),
            "answer_threshold": self.answer_threshold,
            "scope_threshold": self.scope_threshold,
            "topical": {"coef": list(self.topical_coef), "intercept": self.topical_intercept},
            "notes": self.notes,
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """One entry's raw scores for a question, before calibration (what eval/calibrate.py fits on)."""

    row: int
    lexical: float
    cosine: float
    fused: float
    lead: float  # fused score minus the best other candidate's (negative below the first)


@dataclass(frozen=True, slots=True)
class Scored:
    """A question's candidates, best first, and its question-level features."""

    candidates: tuple[Candidate, ...]
    known: float  # share of the question's words that some entry holds
    foreign: float  # 1 when it names something the base never mentions ("Amazon", "Netflix", "France"), else 0
    topical: float = 0.0  # the topic model's score of the question's vector (Calibration.topical)
    vector: Vectors | None = field(default=None, repr=False, compare=False)  # the question's vector, for calibrating

    def answer_features(self, candidate: Candidate) -> dict[str, float]:
        """The answer model's inputs for one candidate."""
        return {
            "lexical": candidate.lexical,
            "cosine": candidate.cosine,
            "fused": candidate.fused,
            "lead": candidate.lead,
            "known": self.known,
            "foreign": self.foreign,
        }

    def scope_features(self) -> dict[str, float]:
        """The scope model's inputs: the best scores of any entry."""
        best = self.candidates[0] if self.candidates else None
        return {
            "lexical": max((c.lexical for c in self.candidates), default=0.0),
            "cosine": max((c.cosine for c in self.candidates), default=0.0),
            "fused": best.fused if best else 0.0,
            "known": self.known,
            "foreign": self.foreign,
            "topical": self.topical,
        }


class DenseIndex:
    """The entries' vectors in one embedding space: two rows per entry (question; question and keywords)."""

    VIEWS = 2

    def __init__(self, embedder_name: str, matrix: Vectors) -> None:
        self.embedder = embedder_name
        self.matrix = matrix

    @staticmethod
    def texts(entries: Sequence[KnowledgeEntry], keywords: Sequence[str]) -> list[str]:
        """What is embedded for each entry, VIEWS texts per entry, in entry order."""
        out: list[str] = []
        for i, entry in enumerate(entries):
            extra = keywords[i] if i < len(keywords) else ""
            out.append(normalise(entry.question))
            out.append(normalise(f"{entry.question} {entry.topic} {extra}"))
        return out

    def cosines(self, query: Vectors) -> Vectors:
        """Each entry's best cosine with the (unit) query vector."""
        if not self.matrix.size:
            return np.zeros(0, dtype=np.float32)
        sims: Vectors = self.matrix @ query.reshape(-1)
        best: Vectors = sims.reshape(-1, self.VIEWS).max(axis=1)
        return best


class HybridRetriever:
    """FTS5/bm25 and dense embeddings fused, calibrated, cached: the server's Retriever."""

    def __init__(
        self,
        knowledge: KnowledgeBase,
        *,
        mode: Mode = "hybrid",
        calibration: Calibration | None = None,
        offline: WordLlamaEmbedder | None = None,
        remote: Embedder | None = None,
        remote_calibration: Calibration | None = None,
        remote_timeout: float = 1.0,
    ) -> None:
        self.knowledge = knowledge
        self.mode: Mode = mode
        self.calibration = calibration or Calibration.load(mode=mode)
        self._offline = offline or offline_embedder()
        self._remote = remote
        self._remote_calibration = remote_calibration or self.calibration
        self._remote_timeout = remote_timeout
        self._remote_index: DenseIndex | None = None
        self._remote_task: asyncio.Task[None] | None = None
        self._results: LRUCache[tuple[str, int], Retrieval] = LRUCache(RESULTS_KEPT)
        self.generation = knowledge.generation
        self._build()

    @classmethod
    def from_settings(cls, settings: Settings, knowledge: KnowledgeBase, http: ProviderHTTP | None = None) -> HybridRetriever:
        """The app's retriever: EMBEDDINGS=wordllama (offline), or openai when a key is set (offline as fallback)."""
        path = Path(settings.calibration_file)
        remote: Embedder | None = None
        remote_calibration = None
        if settings.embeddings == "openai":
            key = settings.openai_api_key.reveal()
            if key:
                remote = OpenAIEmbedder(
                    http or ProviderHTTP(),
                    key,
                    model=settings.openai_embedding_model,
                    base_url=settings.openai_base_url,
                    timeout=settings.embeddings_timeout,
                    cache=VectorCache(Path(settings.data_dir) / "embeddings.sqlite3"),
                )
                if Calibration.fitted(path, remote.name):
                    remote_calibration = Calibration.load(path, remote.name)
                else:  # its scores mean nothing until fitted: the offline model keeps answering
                    logger.warning(
                        "EMBEDDINGS=openai: {} has no calibration for {} (run eval/calibrate.py --embeddings openai);"
                        " using the offline embeddings",
                        path.name,
                        remote.name,
                    )
                    remote = None
            else:
                logger.warning("EMBEDDINGS=openai needs OPENAI_API_KEY: using the offline embeddings")
        elif settings.embeddings != "wordllama":
            raise ValueError(f"Unknown EMBEDDINGS {settings.embeddings!r} (use wordllama or openai).")
        offline = offline_embedder()
        return cls(
            knowledge,
            calibration=Calibration.load(path, offline.name),
            offline=offline,
            remote=remote,
            remote_calibration=remote_calibration,
            remote_timeout=settings.embeddings_timeout,
        )

    # Index -------------------------------------------------------------------------------
    def _build(self) -> None:
        entries = self.knowledge.entries
        self._rows = {entry.id: row for row, entry in enumerate(entries)}
        texts = DenseIndex.texts(entries, self.knowledge.keywords)
        matrix = self._offline.embed_now(texts) if texts else np.zeros((0, 1), np.float32)
        self._index = DenseIndex(self._offline.name, matrix)
        self._results.clear()
        self._remote_index = None
        self.generation = self.knowledge.generation

    async def prepare(self) -> None:
        """Embed the entries with the remote model (cached on disk); until it is done the offline index answers."""
        if self._remote is None:
            return
        texts = DenseIndex.texts(self.knowledge.entries, self.knowledge.keywords)
        generation = self.generation
        try:
            matrix = await self._remote.embed(texts) if texts else np.zeros((0, 1), np.float32)
        except Exception as err:  # the offline index keeps answering; the next question tries again
            logger.warning("remote embeddings of the knowledge base failed ({}): offline embeddings meanwhile", err)
            return
        if generation == self.generation:
            self._remote_index = DenseIndex(self._remote.name, normalize_rows(matrix))
            self._results.clear()
            logger.info("knowledge base embedded with {} ({} entries)", self._remote.name, len(self.knowledge))

    def warm_up(self) -> None:
        """Start embedding the entries with the remote model in the background (nothing to do offline)."""
        self._start_remote()

    def _start_remote(self) -> None:
        if self._remote is None or self._remote_index is not None:
            return
        if self._remote_task is None or self._remote_task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the next retrieve starts it
                self._remote_task = asyncio.get_running_loop().create_task(self.prepare(), name="embed-knowledge")

    async def aclose(self) -> None:
        """Stop a remote embedding still running."""
        if self._remote_task is not None and not self._remote_task.done():
            self._remote_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._remote_task

    # Retrieval ---------------------------------------------------------------------------
    async def retrieve(self, message: str, limit: int = 3) -> Retrieval:
        """The best `limit` entries for a message with calibrated confidences, and the verdict; never raises."""
        if self.generation != self.knowledge.generation:
            self._build()
        text = message if isinstance(message, str) else str(message)
        key = (cache_key(text), limit)
        cached = self._results.get(key)
        if cached is not None:
            return cached
        try:
            result = await self._retrieve(text, limit)
        except Exception as err:  # a broken index must not cost the visitor an answer: "not sure" instead
            logger.warning("retrieval failed: {}", type(err).__name__)
            return Retrieval((), Verdict.UNSURE)
        self._results[key] = result
        return result

    async def _retrieve(self, text: str, limit: int) -> Retrieval:
        if small_talk(text) is not None:
            return Retrieval((), Verdict.SMALL_TALK)
        scored, calibration = await self._scored(self.searched_text(text))
        matches = tuple(
            RankedEntry(self.knowledge.entries[c.row], round(calibration.answer(scored.answer_features(c)), 4))
            for c in scored.candidates[: max(0, limit)]
        )
        if injection(text) or not scored.candidates:
            return Retrieval(matches, Verdict.OFF_TOPIC)
        if calibration.scope(scored.scope_features()) < calibration.scope_threshold:
            return Retrieval(matches, Verdict.OFF_TOPIC)
        if matches and matches[0].confidence >= calibration.answer_threshold:
            return Retrieval(matches, Verdict.ANSWER)
        return Retrieval(matches, Verdict.UNSURE)

    def searched_text(self, text: str) -> str:
        """What is searched and embedded of a question: identifiers out, then misspelt words corrected.

        Public for eval/calibrate.py, which must score exactly what the server scores.
        """
        return self.knowledge.spelled(without_identifiers(text))

    async def _scored(self, text: str) -> tuple[Scored, Calibration]:
        """The candidates in the best vector space available now (remote, else offline) and its calibration."""
        index, calibration, query = self._index, self.calibration, None
        normalised = normalise(text)
        if self._remote is not None and self.mode != "bm25":
            self._start_remote()
            if self._remote_index is not None:
                try:
                    query = (await asyncio.wait_for(self._remote.embed([normalised]), self._remote_timeout))[0]
                    index, calibration = self._remote_index, self._remote_calibration
                except Exception as err:  # timeout, HTTP error, no network: the offline model answers
                    logger.debug("remote question embedding failed ({}): offline embedding", type(err).__name__)
                    query = None
        return self.score(text, query, index, calibration), calibration

    def score(
        self,
        text: str,
        query: Vectors | None = None,
        index: DenseIndex | None = None,
        calibration: Calibration | None = None,
    ) -> Scored:
        """Raw, uncalibrated candidates for a question as `searched_text` gives it; with no `query` vector, the
        offline model's.

        Public for eval/calibrate.py, which fits the calibration on exactly these numbers.
        """
        calibration = calibration or self.calibration
        index = index or self._index
        if query is None and self.mode != "bm25":
            query = self._offline.embed_now([normalise(text)])[0]
        words = terms(text)[:MAX_QUERY_TERMS]
        known = len(self.knowledge.known_terms(text)) / len(words) if words else 0.0
        foreign = 1.0 if any(not self.knowledge.known_terms(name) for name in names(text)) else 0.0
        lexical: dict[int, float] = {}
        if self.mode != "dense":
            for match in self.knowledge.search_terms(words, limit=CANDIDATES):
                lexical[self._rows[match.entry.id]] = match.score
        n = len(self.knowledge)
        cosines = index.cosines(query) if query is not None and self.mode != "bm25" else np.zeros(n, np.float32)
        rows = set(lexical)
        if self.mode != "bm25" and n:
            top = min(DENSE_CANDIDATES, n)
            best = np.argpartition(-cosines, top - 1)[:top] if n > top else np.arange(n)
            rows.update(int(r) for r in best)
        fused = self._fuse(rows, lexical, cosines, calibration)
        order = sorted(rows, key=lambda r: (-fused[r], -lexical.get(r, 0.0), r))
        candidates = []
        for position, row in enumerate(order):
            other = fused[order[1]] if position == 0 and len(order) > 1 else (fused[order[0]] if position else 0.0)
            candidates.append(Candidate(row, lexical.get(row, 0.0), float(cosines[row]), fused[row], fused[row] - other))
        return Scored(tuple(candidates), known, foreign, calibration.topical(query), query)

    def _fuse(self, rows: set[int], lexical: dict[int, float], cosines: Vectors, calibration: Calibration) -> dict[int, float]:
        if self.mode == "bm25":
            return {r: lexical.get(r, 0.0) for r in rows}
        if self.mode == "dense":
            return {r: float(cosines[r]) for r in rows}
        if calibration.fusion == "rrf":
            k = calibration.rrf_k
            by_lexical = {r: i for i, r in enumerate(sorted(lexical, key=lambda r: -lexical[r]), start=1)}
            by_dense = {r: i for i, r in enumerate(sorted(rows, key=lambda r: -float(cosines[r])), start=1)}
            return {r: (1.0 / (k + by_lexical[r]) if r in by_lexical else 0.0) + 1.0 / (k + by_dense[r]) for r in rows}
        w = calibration.lexical_weight
        return {r: w * lexical.get(r, 0.0) + (1.0 - w) * max(0.0, float(cosines[r])) for r in rows}


def offline_retriever(knowledge: KnowledgeBase, mode: Mode = "hybrid", calibration: Calibration | None = None) -> HybridRetriever:
    """A retriever with the offline embeddings only (what `make eval` measures): `mode` bm25, dense or hybrid."""
    return HybridRetriever(knowledge, mode=mode, calibration=calibration)
