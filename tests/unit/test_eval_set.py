"""The labelled evaluation set (eval/questions.jsonl) and `make eval`: the set keeps the shape issue 14 asks for,
its labels point at entries that exist, and the runner writes its table where the docs expect it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from eval import run
from eval.dataset import KINDS, SPLITS, Kind, Question, load
from server.ai.knowledge import KnowledgeBase

ROOT = Path(__file__).resolve().parents[2]
MINIMUM: dict[Kind, int] = {"in_scope": 150, "off_topic": 40, "adversarial": 20}


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return load()


@pytest.fixture(scope="module")
def entry_ids() -> set[str]:
    return {e.id for e in KnowledgeBase.from_directory(ROOT / "config" / "knowledge").entries}


def test_counts_per_kind_meet_the_issue_minimums(questions: list[Question]) -> None:
    counts = Counter(q.kind for q in questions)
    for kind, minimum in MINIMUM.items():
        assert counts[kind] >= minimum, f"{kind}: {counts[kind]} questions, the issue asks for at least {minimum}"


def test_ids_and_texts_are_unique(questions: list[Question]) -> None:
    assert len({q.id for q in questions}) == len(questions)
    texts = Counter(" ".join(q.text.casefold().split()) for q in questions)
    assert [t for t, n in texts.items() if n > 1] == []


def test_every_acceptable_entry_exists_and_labels_fit_the_kind(questions: list[Question], entry_ids: set[str]) -> None:
    for q in questions:
        assert q.text.strip(), q.id
        if q.kind == "in_scope":
            assert q.acceptable, f"{q.id} is in scope but lists no acceptable entry"
            assert len(set(q.acceptable)) == len(q.acceptable), q.id
            unknown = set(q.acceptable) - entry_ids
            assert not unknown, f"{q.id}: {sorted(unknown)} are not knowledge-base entries"
        else:
            assert q.acceptable == (), f"{q.id}: an {q.kind} question has no acceptable entry"


def test_every_entry_is_the_answer_to_some_question(questions: list[Question], entry_ids: set[str]) -> None:
    labelled = {entry for q in questions for entry in q.acceptable}
    assert entry_ids - labelled == set(), "entries no question asks about go unmeasured"


def test_the_in_scope_styles_are_all_there(questions: list[Question]) -> None:
    styles = Counter(q.style for q in questions if q.kind == "in_scope")
    for style in ("paraphrase", "typo", "long", "fragment", "multi"):
        assert styles[style] >= 15, f"only {styles[style]} {style} questions"
    multi = [q for q in questions if q.style == "multi"]
    assert all(len(q.acceptable) >= 2 for q in multi), "a question that needs two entries lists both"


def test_both_splits_hold_every_kind_and_about_forty_percent_is_held_out(questions: list[Question]) -> None:
    for kind in KINDS:
        splits = Counter(q.split for q in questions if q.kind == kind)
        assert set(splits) == set(SPLITS), f"{kind}: {dict(splits)}"
        share = splits["heldout"] / sum(splits.values())
        assert 0.3 <= share <= 0.5, f"{kind}: {share:.0%} held out"
    groups = Counter((q.kind, q.style) for q in questions)
    held = Counter((q.kind, q.style) for q in questions if q.split == "heldout")
    for group, size in groups.items():
        if size >= 5:  # stratified: every sizeable (kind, style) group is in both splits
            assert 0 < held[group] < size, group


def test_load_filters_by_split(questions: list[Question]) -> None:
    tune, heldout = load("tune"), load("held-out")
    assert {q.split for q in tune} == {"tune"} and {q.split for q in heldout} == {"heldout"}
    assert len(tune) + len(heldout) == len(questions)
    with pytest.raises(ValueError):
        load("test")


def test_the_issue_examples_are_in_the_set(questions: list[Question]) -> None:
    by_text = {q.text: q for q in questions}
    lamp = by_text["I want to return a lamp I bought two weeks ago. How do I do that?"]
    assert "returns-2" in lamp.acceptable and "orders-6" not in lamp.acceptable
    dislike = by_text["Can I send back a lamp I don't like?"]
    assert dislike.kind == "in_scope" and "orders-6" not in dislike.acceptable
    assert by_text["Do you sell gift cards?"].acceptable == ("payments-7",)
    assert by_text["What is the capital of France?"].kind == "off_topic"


async def test_make_eval_prints_the_table_and_writes_it_between_the_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "evaluation.md"
    doc.write_text(f"# Evaluating retrieval\n\n{run.BEGIN}\nold table\n{run.END}\n\n## Method\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(f"- `make eval`: on the held-out questions:\n  {run.SUMMARY_BEGIN}\n  old\n  {run.SUMMARY_END}\n")
    assert await run.main(["--doc", str(doc), "--readme", str(readme), "--repeat", "1"]) == 0
    printed = capsys.readouterr().out
    written = doc.read_text(encoding="utf-8")
    assert "old table" not in written and written.endswith("## Method\n")
    for mode in ("bm25", "dense", "hybrid"):
        assert f"| {mode} |" in printed and f"| {mode} |" in written
    assert "| bm25 | held-out |" in written and "| bm25 | tune |" in written
    assert "make eval" in written and "Held-out targets" in written
    summary = readme.read_text(encoding="utf-8")
    assert "old" not in summary and "top-1" in summary and "off-topic answered as off-topic" in summary


def test_the_shipped_docs_have_the_markers() -> None:
    for name, begin, end in (("docs/evaluation.md", run.BEGIN, run.END), ("README.md", run.SUMMARY_BEGIN, run.SUMMARY_END)):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert text.count(begin) == 1 and text.count(end) == 1, name
        assert text.index(begin) < text.index(end), name
