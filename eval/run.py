"""`make eval`: how well the offline retrieval answers the labelled questions, per mode and split.

For bm25 alone, dense alone and the hybrid of the two (`server.ai.hybrid.offline_retriever`), on the tune split and
the held-out split, it measures top-1 accuracy, top-3 recall, how many in-scope questions get a confident answer,
the confidently-wrong rate, off-topic rejection and the latency of one `retrieve()` call. It prints one table and
writes it into docs/evaluation.md between `<!-- eval:begin -->` and `<!-- eval:end -->` (definitions there).

Usage: python eval/run.py [--modes bm25,dense,hybrid] [--no-write] [--misses] [--check] [--doc docs/evaluation.md]
  --misses  also lists the tune split's wrong answers and misses per mode (never the held-out ones: they are not
            for tuning)
  --check   exit with status 1 when the hybrid's held-out figures miss a target
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (`python eval/run.py`): make `server` and `eval` importable
    sys.path.insert(0, str(ROOT))

from eval.dataset import SPLITS, Question, load  # noqa: E402
from server.ai.knowledge import KnowledgeBase  # noqa: E402
from server.ai.retrieval import RankedEntry, Retrieval, Retriever, Verdict  # noqa: E402

KNOWLEDGE = ROOT / "config" / "knowledge"
DOC = ROOT / "docs" / "evaluation.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- eval:begin -->", "<!-- eval:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- eval:summary:begin -->", "<!-- eval:summary:end -->"
MODES = ("bm25", "dense", "hybrid")
CONFIDENT = 0.5  # a top match at or above this confidence is answered (the calibrated answer threshold)
REJECTING = frozenset({Verdict.OFF_TOPIC, Verdict.SMALL_TALK})  # verdicts that give no knowledge-base answer
WARMUP = ("warm up the retriever", "another warm-up sentence about nothing", "zzz")

# Held-out targets from issue 14: (column, comparison, bound).
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("top1", ">=", 0.90),
    ("wrong", "<=", 0.02),
    ("as_off_topic", ">=", 0.95),
    ("p99_ms", "<", 5.0),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the retriever made of one question, and how long it took."""

    question: Question
    retrieval: Retrieval
    millis: float

    @property
    def ids(self) -> tuple[str, ...]:
        """The ranked entry ids, best first."""
        return tuple(match.entry.id for match in self.retrieval.matches)

    @property
    def answered(self) -> bool:
        """Whether the assistant answers from the top entry: confident enough, and not judged off-topic."""
        return bool(self.retrieval.matches) and self.retrieval.confidence >= CONFIDENT and self.retrieval.verdict not in REJECTING

    @property
    def right(self) -> bool:
        """Whether the top entry is one of the acceptable ones (never for an off-topic or adversarial question)."""
        return bool(self.ids) and self.ids[0] in self.question.acceptable

    @property
    def recall3(self) -> float:
        """Share of the acceptable entries found in the top 3 (of at most 3 of them)."""
        wanted = self.question.acceptable
        return len(set(wanted) & set(self.ids[:3])) / min(len(wanted), 3) if wanted else 0.0


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: one mode on one split."""

    mode: str
    split: str
    questions: int
    in_scope: int
    others: int
    top1: float
    recall3: float
    coverage: float
    wrong: float
    rejected: float
    as_off_topic: float
    p50_ms: float
    p99_ms: float
    p99_any_run_ms: float  # over every run's latencies, scheduler noise included
    inconsistent: int  # verdict "answer" below the threshold, or the other way round: a retriever bug to look at


class Bm25StandIn:
    """The lexical KnowledgeBase.search as a Retriever: used for bm25 until server.ai.hybrid exists."""

    def __init__(self, knowledge: KnowledgeBase) -> None:
        self.knowledge = knowledge
        self.generation = knowledge.generation

    async def retrieve(self, message: str, limit: int = 3) -> Retrieval:
        """The knowledge base's own ranking, its score taken as the confidence."""
        matches = tuple(RankedEntry(m.entry, m.score) for m in self.knowledge.search(message, limit))
        if not matches:
            return Retrieval((), Verdict.OFF_TOPIC)
        return Retrieval(matches, Verdict.ANSWER if matches[0].confidence >= CONFIDENT else Verdict.UNSURE)


def retriever_factory() -> tuple[Callable[[KnowledgeBase, str], object] | None, str]:
    """server.ai.hybrid.offline_retriever when it exists, else None and why."""
    try:
        from server.ai import hybrid
    except (ImportError, SyntaxError) as err:  # not written yet, or half-written
        return None, f"server.ai.hybrid not importable ({type(err).__name__}: {err})"
    factory = getattr(hybrid, "offline_retriever", None)
    if factory is None:
        return None, "server.ai.hybrid has no offline_retriever"
    return (lambda knowledge, mode: factory(knowledge, mode=mode)), "server.ai.hybrid.offline_retriever"


async def make_retriever(knowledge: KnowledgeBase, mode: str) -> Retriever | None:
    """The retriever for one mode, or None when it isn't available yet."""
    factory, _ = retriever_factory()
    if factory is None:
        return Bm25StandIn(knowledge) if mode == "bm25" else None
    made = factory(knowledge, mode)
    if inspect.isawaitable(made):
        made = await made
    return cast(Retriever, made)


async def measure(retriever: Retriever, questions: Sequence[Question]) -> list[Outcome]:
    """Each question retrieved once (a fresh question each time: no cache hit), timed around retrieve()."""
    for text in WARMUP:  # first-call costs (lazy loads) are start-up, not per-question latency
        await retriever.retrieve(text, limit=3)
    gc.collect()
    outcomes = []
    for question in questions:
        started = time.perf_counter()
        retrieval = await retriever.retrieve(question.text, limit=3)
        millis = (time.perf_counter() - started) * 1000
        outcomes.append(Outcome(question, retrieval, millis))
    return outcomes


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (the smallest value with at least `share` of the values at or below it)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else math.nan


def ratio(count: float, total: int) -> float:
    """count / total, NaN for an empty group."""
    return count / total if total else math.nan


def summarize(mode: str, split: str, outcomes: Sequence[Outcome], every_run: Sequence[float] = ()) -> Row:
    """The table row for one mode on one split; `every_run` holds each run's latencies, not only the fastest."""
    scope = [o for o in outcomes if o.question.in_scope]
    others = [o for o in outcomes if not o.question.in_scope]
    inconsistent = sum(
        1
        for o in outcomes
        if (o.retrieval.verdict == Verdict.ANSWER and o.retrieval.confidence < CONFIDENT)
        or (o.retrieval.verdict == Verdict.UNSURE and o.retrieval.confidence >= CONFIDENT)
    )
    return Row(
        mode=mode,
        split=split,
        questions=len(outcomes),
        in_scope=len(scope),
        others=len(others),
        top1=ratio(sum(o.right for o in scope), len(scope)),
        recall3=ratio(sum(o.recall3 for o in scope), len(scope)),
        coverage=ratio(sum(o.answered and o.right for o in scope), len(scope)),
        wrong=ratio(sum(o.answered and not o.right for o in outcomes), len(outcomes)),
        rejected=ratio(sum(not o.answered for o in others), len(others)),
        as_off_topic=ratio(sum(o.retrieval.verdict in REJECTING for o in others), len(others)),
        p50_ms=percentile([o.millis for o in outcomes], 0.50),
        p99_ms=percentile([o.millis for o in outcomes], 0.99),
        p99_any_run_ms=percentile(every_run or [o.millis for o in outcomes], 0.99),
        inconsistent=inconsistent,
    )


def pct(value: float) -> str:
    """A share as a percentage with one decimal."""
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def table(rows: Sequence[Row], missing: dict[str, str]) -> str:
    """The markdown table of every row, one line per mode and split, then the modes that could not run."""
    lines = [
        "| mode | split | questions (in scope / other) | top-1 | top-3 recall | answered right | confidently wrong"
        " | rejected | as off-topic | p50 ms | p99 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {'held-out' if r.split == 'heldout' else r.split} | {r.questions} ({r.in_scope} / {r.others})"
            f" | {pct(r.top1)} | {pct(r.recall3)} | {pct(r.coverage)} | {pct(r.wrong)} | {pct(r.rejected)}"
            f" | {pct(r.as_off_topic)} | {r.p50_ms:.3f} | {r.p99_ms:.3f} |"
        )
    for mode, why in missing.items():
        lines.append(f"| {mode} | — | not measured: {why} | | | | | | | | |")
    return "\n".join(lines)


def check_targets(rows: Sequence[Row]) -> list[str]:
    """One line per held-out hybrid target: the figure, the bound and whether it is met."""
    hybrid = next((r for r in rows if r.mode == "hybrid" and r.split == "heldout"), None)
    if hybrid is None:
        return ["hybrid held-out: not measured, targets not checked"]
    names = {"top1": "top-1", "wrong": "confidently wrong", "as_off_topic": "off-topic as off-topic", "p99_ms": "p99"}
    lines = []
    for column, comparison, bound in TARGETS:
        value = getattr(hybrid, column)
        met = value >= bound if comparison == ">=" else value <= bound if comparison == "<=" else value < bound
        shown = f"{value:.3f} ms" if column == "p99_ms" else pct(value)
        wanted = f"{bound} ms" if column == "p99_ms" else pct(bound)
        lines.append(f"{'met ' if met else 'MISSED'} {names[column]}: {shown} (target {comparison} {wanted})")
    lines.append(f"(p99 over every run rather than each question's fastest: {hybrid.p99_any_run_ms:.3f} ms)")
    return lines


def misses(mode: str, outcomes: Sequence[Outcome]) -> list[str]:
    """The tune split's questions a mode ranks wrong or answers wrongly, for whoever tunes it."""
    lines = []
    for o in outcomes:
        if o.question.split != "tune":
            continue
        top = f"{o.ids[0]}@{o.retrieval.confidence:.2f} {o.retrieval.verdict}" if o.ids else f"nothing {o.retrieval.verdict}"
        said = f"{o.question.id} [{o.question.style}] {o.question.text!r} -> {top}"
        if o.question.in_scope and not o.right:
            lines.append(f"  {mode} miss   {said} (want {', '.join(o.question.acceptable)})")
        elif o.answered and not o.right:
            lines.append(f"  {mode} WRONG  {said}")
    return lines


def write_between(path: Path, begin: str, end: str, text: str) -> bool:
    """Replace what is between two marker lines of a document; False when the file or the markers are missing."""
    if not path.exists():
        return False
    doc = path.read_text(encoding="utf-8")
    pattern = re.compile(r"([ \t]*)" + re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    found = pattern.search(doc)
    if found is None:
        return False
    indent = found.group(1)
    block = "\n".join(f"{indent}{line}" if line else line for line in [begin, *text.splitlines(), end])
    path.write_text(doc[: found.start()] + block + doc[found.end() :], encoding="utf-8")
    return True


def summary(rows: Sequence[Row], stamp: str) -> str | None:
    """The hybrid's held-out figures in one sentence, for the README; None when the hybrid was not measured."""
    r = next((r for r in rows if r.mode == "hybrid" and r.split == "heldout"), None)
    if r is None:
        return None
    return (
        f"top-1 {pct(r.top1)}, top-3 recall {pct(r.recall3)}, confidently wrong {pct(r.wrong)}, off-topic answered as"
        f" off-topic {pct(r.as_off_topic)}, p99 {r.p99_ms:.2f} ms per question ({r.questions} questions, {stamp})."
    )


def shown(path: Path) -> str:
    """A path as the user typed `make eval` would read it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


async def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation, print the table, write it into the docs; the exit status for --check."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (bm25, dense, hybrid)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/evaluation.md alone")
    parser.add_argument("--misses", action="store_true", help="list the tune split's misses and wrong answers")
    parser.add_argument("--check", action="store_true", help="exit 1 when a held-out hybrid target is missed")
    parser.add_argument("--repeat", type=int, default=3, help="runs per question; its latency is the fastest run")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document whose marked section gets the table")
    parser.add_argument("--readme", type=Path, default=README, help="the document whose marked line gets the summary")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    started = time.perf_counter()
    knowledge = KnowledgeBase.from_directory(KNOWLEDGE)
    questions = {split: load(split) for split in SPLITS}
    rows: list[Row] = []
    missing: dict[str, str] = {}
    detail: list[str] = []
    _, source = retriever_factory()
    stand_in = ""
    for mode in modes:
        retriever = await make_retriever(knowledge, mode)
        if retriever is None:
            missing[mode] = source
            continue
        if isinstance(retriever, Bm25StandIn):
            stand_in = " (bm25 through the KnowledgeBase.search stand-in)"
        for split in SPLITS:
            runs = [await measure(retriever, questions[split])]
            for _ in range(args.repeat - 1):  # a fresh retriever each run: every question is new to it
                runs.append(await measure(cast(Retriever, await make_retriever(knowledge, mode)), questions[split]))
            outcomes = [replace(first, millis=min(run[i].millis for run in runs)) for i, first in enumerate(runs[0])]
            rows.append(summarize(mode, split, outcomes, [o.millis for run in runs for o in run]))
            if args.misses:
                detail.extend(misses(mode, outcomes))
    elapsed = time.perf_counter() - started
    body = table(rows, missing)
    targets = check_targets(rows)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    counts = ", ".join(f"{'held-out' if s == 'heldout' else s} {len(questions[s])}" for s in SPLITS)
    header = (
        f"Measured {stamp} with `make eval` (`python eval/run.py`): {len(knowledge)} entries, questions {counts}"
        f"{stand_in}; latency is each question's fastest of {args.repeat} runs; {elapsed:.1f} s in all."
    )
    print(header, body, "", "Held-out targets (hybrid):", *(f"  {line}" for line in targets), sep="\n")
    inconsistent = sum(r.inconsistent for r in rows)
    if inconsistent:
        print(f"warning: {inconsistent} retrievals have verdict 'answer' on the wrong side of {CONFIDENT}")
    if detail:
        print("", "Tune-split misses:", *detail, sep="\n")
    if not args.no_write:
        text = "\n".join([header, "", body, "", "Held-out targets (hybrid):", "", *(f"- {line}" for line in targets)])
        if write_between(args.doc, BEGIN, END, text):
            print(f"wrote the table into {shown(args.doc)}")
        else:
            print(f"{shown(args.doc)} has no {BEGIN} … {END} markers: nothing written")
        line = summary(rows, stamp)
        if line is not None and write_between(args.readme, SUMMARY_BEGIN, SUMMARY_END, line):
            print(f"wrote the held-out summary into {shown(args.readme)}")
    return 1 if args.check and any(line.startswith(("MISSED", "hybrid held-out: not")) for line in targets) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
