"""Fit config/calibration.json on the TUNE split of eval/questions.jsonl (the held-out split is never read here).

    .venv/bin/python eval/calibrate.py            # writes config/calibration.json and prints what it chose

For each retrieval mode (bm25, dense, hybrid):

1. hybrid only: the fusion. Every weighted sum `w * lexical + (1 - w) * cosine` (w = 0, 0.05 … 1) and reciprocal
   rank fusion with k in {5, 10, 20, 40, 60} rank the tune questions; the best top-1 accuracy wins (then top-3
   recall, then mean reciprocal rank).
2. `answer`: a logistic regression on the top three candidates of every tune question (label: the candidate is an
   acceptable entry; off-topic and adversarial questions have none), then its intercept shifted so that a
   confidence of 0.5 is the lowest threshold at which the tune split's best answers are right >= TARGET_PRECISION
   of the time: "confidence >= 0.5" means "right at least 95% of the time", not "right half of the time".
3. `scope`: a logistic regression telling in-scope questions from off-topic and adversarial ones. One of its
   inputs is `topical`, itself a logistic regression on the question's vector (dense and hybrid): the tune
   split's in-scope questions and the entries' own embedded texts against its off-topic and adversarial
   questions. The scope model is fitted on out-of-fold `topical` scores (TOPICAL_FOLDS), so it learns how far
   the score can be trusted on questions the topic model has not seen.

scikit-learn is a dev dependency used only here; the server reads the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # type: ignore[import-untyped]  # noqa: E402

from eval.dataset import Question, load  # noqa: E402
from server.ai.embeddings import OpenAIEmbedder  # noqa: E402
from server.ai.http import ProviderHTTP  # noqa: E402
from server.ai.hybrid import (  # noqa: E402
    ANSWER_FEATURES,
    CALIBRATION_FILE,
    SCOPE_FEATURES,
    Calibration,
    DenseIndex,
    HybridRetriever,
    Logistic,
    Mode,
    Scored,
    injection,
    normalise,
    small_talk,
)
from server.ai.knowledge import KnowledgeBase  # noqa: E402
from server.settings import Settings  # noqa: E402

TARGET_PRECISION = 0.96  # on the tune split, a little above the 95% promised, so the held-out split keeps it
SCOPE_KEEP = 0.98  # share of the tune split's in-scope questions the scope model must keep in scope
TOP = 3  # candidates per question the answer model is fitted on
WEIGHTS = [round(0.05 * i, 2) for i in range(21)]
RRF_KS = [5.0, 10.0, 20.0, 40.0, 60.0]
TOPICAL_C = 1.0  # the topic model's inverse regularisation (unit vectors of 256 dimensions, ~300 examples)
TOPICAL_FOLDS = 5


def _fit(rows: list[dict[str, float]], labels: list[int], features: tuple[str, ...]) -> Logistic:
    x = np.array([[r[f] for f in features] for r in rows], dtype=np.float64)
    y = np.array(labels)
    model = LogisticRegression(C=10.0, max_iter=2000).fit(x, y)
    return Logistic(features, tuple(float(c) for c in model.coef_[0]), float(model.intercept_[0]))


def _threshold(scores: list[float], right: list[bool], target: float) -> float:
    """The lowest score t such that the answers scoring >= t are right at least `target` of the time."""
    best = 1.0 - 1e-6
    pairs = sorted(zip(scores, right, strict=True), key=lambda p: -p[0])
    correct = 0
    for count, (score, ok) in enumerate(pairs, start=1):
        correct += ok
        nxt = pairs[count][0] if count < len(pairs) else -1.0
        if nxt < score and correct / count >= target:  # only at the end of a run of equal scores
            best = score
    return best


def _ranking_quality(scored: list[tuple[Question, Scored]], entries: tuple[Any, ...]) -> tuple[float, float, float]:
    top1 = top3 = rr = 0.0
    in_scope = [(q, s) for q, s in scored if q.in_scope]
    for question, result in in_scope:
        ids = [entries[c.row].id for c in result.candidates]
        hits = [i for i, eid in enumerate(ids) if eid in question.acceptable]
        top1 += bool(hits and hits[0] == 0)
        top3 += bool(hits and hits[0] < 3)
        rr += 1.0 / (hits[0] + 1) if hits else 0.0
    n = max(1, len(in_scope))
    return top1 / n, top3 / n, rr / n


@dataclass
class Space:
    """The vector space calibrated: the offline model's (vectors computed by the retriever) or a remote model's."""

    name: str
    index: DenseIndex | None = None
    vectors: dict[str, Any] = field(default_factory=dict)  # question id -> its remote vector

    def score(self, retriever: HybridRetriever, question: Question, text: str, calibration: Calibration) -> Scored:
        """The question's raw candidates in this space."""
        return retriever.score(text, self.vectors.get(question.id), self.index, calibration)


def calibrate_mode(
    retriever: HybridRetriever, questions: list[Question], mode: Mode, space: Space
) -> tuple[Calibration, dict[str, Any]]:
    """One mode's calibration from the tune questions, and what was measured on the way."""
    retriever.mode = mode
    entries = retriever.knowledge.entries
    searched = [q for q in questions if small_talk(q.text) is None and not injection(q.text)]
    spelled = {q.id: retriever.searched_text(q.text) for q in searched}
    base = Calibration(embedder=space.name)
    notes: dict[str, Any] = {}
    if mode == "hybrid":
        trials: list[tuple[tuple[float, float, float], Calibration]] = []
        for w in WEIGHTS:
            trials.append(
                (
                    _quality(retriever, space, searched, spelled, replace(base, fusion="weighted", lexical_weight=w)),
                    replace(base, fusion="weighted", lexical_weight=w),
                )
            )
        for k in RRF_KS:
            trials.append(
                (
                    _quality(retriever, space, searched, spelled, replace(base, fusion="rrf", rrf_k=k)),
                    replace(base, fusion="rrf", rrf_k=k),
                )
            )
        best_weighted = max((t for t in trials if t[1].fusion == "weighted"), key=lambda t: t[0])
        best_rrf = max((t for t in trials if t[1].fusion == "rrf"), key=lambda t: t[0])
        _, base = max(trials, key=lambda t: t[0])
        notes["fusion_trials"] = {
            "best_weighted": {"lexical_weight": best_weighted[1].lexical_weight, "top1_top3_mrr": _round(best_weighted[0])},
            "best_rrf": {"rrf_k": best_rrf[1].rrf_k, "top1_top3_mrr": _round(best_rrf[0])},
        }
    scored = [(q, space.score(retriever, q, spelled[q.id], base)) for q in searched]
    notes["tune_top1_top3_mrr"] = _round(_ranking_quality(scored, entries))

    rows: list[dict[str, float]] = []
    labels: list[int] = []
    for question, result in scored:
        for candidate in result.candidates[:TOP]:
            rows.append(result.answer_features(candidate))
            labels.append(int(entries[candidate.row].id in question.acceptable))
    answer = _fit(rows, labels, ANSWER_FEATURES)
    firsts = [(q, r) for q, r in scored if r.candidates]
    probabilities = [answer(r.answer_features(r.candidates[0])) for _, r in firsts]
    right = [entries[r.candidates[0].row].id in q.acceptable for q, r in firsts]
    t = _threshold(probabilities, right, TARGET_PRECISION)
    shift = math.log(t / (1.0 - t))
    answer = replace(answer, intercept=answer.intercept - shift)
    confident = [ok for p, ok in zip(probabilities, right, strict=True) if p >= t]
    notes["answer_threshold_probability"] = round(t, 4)
    notes["tune_answered"] = len(confident)
    notes["tune_questions"] = len(questions)
    notes["tune_precision_at_0_5"] = round(sum(confident) / len(confident), 4) if confident else None

    scope_labels = [int(q.in_scope) for q, _ in scored]
    topical = _topical(scored, scope_labels, space.index or retriever._index) if mode != "bm25" else None
    out_of_fold = topical[1] if topical else [0.0] * len(scored)
    scope_rows = [{**r.scope_features(), "topical": t} for (_, r), t in zip(scored, out_of_fold, strict=True)]
    scope = _fit(scope_rows, scope_labels, SCOPE_FEATURES)
    scope_threshold = _scope_threshold([scope(f) for f in scope_rows], scope_labels)
    in_scope_kept = [scope(f) >= scope_threshold for f, y in zip(scope_rows, scope_labels, strict=True) if y]
    off_rejected = [scope(f) < scope_threshold for f, y in zip(scope_rows, scope_labels, strict=True) if not y]
    notes["scope_threshold"] = scope_threshold
    notes["tune_scope_in_scope_kept"] = round(sum(in_scope_kept) / max(1, len(in_scope_kept)), 4)
    notes["tune_scope_off_topic_rejected"] = round(sum(off_rejected) / max(1, len(off_rejected)), 4)
    coef, intercept = topical[0] if topical else ((), 0.0)
    fitted = replace(
        base,
        answer=answer,
        scope=scope,
        scope_threshold=scope_threshold,
        topical_coef=coef,
        topical_intercept=intercept,
        notes=notes,
    )
    return fitted, notes


def _topical(
    scored: list[tuple[Question, Scored]], labels: list[int], index: DenseIndex
) -> tuple[tuple[tuple[float, ...], float], list[float]]:
    """The topic model (coefficients, intercept) fitted on every tune question's vector plus the entries' own
    vectors (in scope), and each tune question's out-of-fold score (its fold left out of the fit)."""
    vectors = np.array([np.asarray(r.vector, dtype=np.float64).reshape(-1) for _, r in scored])
    y = np.array(labels)
    entries = np.asarray(index.matrix, dtype=np.float64)
    ones = np.ones(len(entries), dtype=int)

    def fit(rows: np.ndarray) -> LogisticRegression:
        x = np.vstack([vectors[rows], entries])
        return LogisticRegression(C=TOPICAL_C, max_iter=5000).fit(x, np.concatenate([y[rows], ones]))

    out = np.zeros(len(scored))
    for train, test in StratifiedKFold(TOPICAL_FOLDS, shuffle=True, random_state=0).split(vectors, y):
        out[test] = fit(train).decision_function(vectors[test])
    model = fit(np.arange(len(scored)))
    return (tuple(float(c) for c in model.coef_[0]), float(model.intercept_[0])), [float(v) for v in out]


def _scope_threshold(scores: list[float], in_scope: list[int]) -> float:
    """The highest threshold (of 0.05 … 0.9) that still keeps SCOPE_KEEP of the in-scope questions in scope.

    Calling an in-scope question off-topic costs more (a visitor with a real question gets a scope answer) than
    the reverse (an off-topic question gets "not sure, did you mean…", and no confident answer either way).
    """
    kept = [s for s, y in zip(scores, in_scope, strict=True) if y]
    for threshold in [round(0.9 - 0.05 * i, 2) for i in range(18)]:
        if sum(s >= threshold for s in kept) >= SCOPE_KEEP * len(kept):
            return threshold
    return 0.05


def _quality(
    retriever: HybridRetriever,
    space: Space,
    questions: list[Question],
    spelled: dict[str, str],
    calibration: Calibration,
) -> tuple[float, float, float]:
    scored = [(q, space.score(retriever, q, spelled[q.id], calibration)) for q in questions]
    return _ranking_quality(scored, retriever.knowledge.entries)


def _round(values: tuple[float, ...]) -> list[float]:
    return [round(v, 4) for v in values]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    parser.add_argument(
        "--embeddings",
        choices=("wordllama", "openai"),
        default="wordllama",
        help="openai: fit a section for OPENAI_EMBEDDING_MODEL too (needs OPENAI_API_KEY; other sections are kept)",
    )
    args = parser.parse_args()
    settings = Settings.from_env()
    knowledge = KnowledgeBase.from_directory(settings.knowledge_dir, store_name=settings.store_name)
    questions = load("tune")
    retriever = HybridRetriever(knowledge, calibration=Calibration())
    space = Space(retriever._offline.name)
    if args.embeddings == "openai":
        space = await _remote_space(settings, retriever, questions)
    modes: dict[str, Any] = {}
    for mode in ("bm25", "dense", "hybrid"):
        calibration, notes = calibrate_mode(retriever, questions, mode, space)
        modes[mode] = calibration.to_dict()
        print(f"{mode:7s} {json.dumps(notes)}")
    try:
        models = json.loads(args.out.read_text(encoding="utf-8"))["models"] if args.embeddings == "openai" else {}
    except (OSError, ValueError, KeyError):
        models = {}
    document = {
        "about": "Fitted by eval/calibrate.py on the tune split of eval/questions.jsonl only; the server loads it.",
        "fitted_at": datetime.now(UTC).strftime("%Y-%m-%d"),
        "target_precision": TARGET_PRECISION,
        "models": {**models, space.name: modes},
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


async def _remote_space(settings: Settings, retriever: HybridRetriever, questions: list[Question]) -> Space:
    """The entries and tune questions embedded by OPENAI_EMBEDDING_MODEL (as the server embeds them)."""
    key = settings.openai_api_key.reveal()
    if not key:
        raise SystemExit("--embeddings openai needs OPENAI_API_KEY")
    http = ProviderHTTP()
    remote = OpenAIEmbedder(http, key, model=settings.openai_embedding_model, base_url=settings.openai_base_url, timeout=30.0)
    try:
        knowledge = retriever.knowledge
        matrix = await remote.embed(DenseIndex.texts(knowledge.entries, knowledge.keywords))
        texts = [normalise(retriever.searched_text(q.text)) for q in questions]
        vectors = await remote.embed(texts)
    finally:
        await http.aclose()
    return Space(remote.name, DenseIndex(remote.name, matrix), {q.id: v for q, v in zip(questions, vectors, strict=True)})


if __name__ == "__main__":
    asyncio.run(main())
