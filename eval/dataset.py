"""The labelled questions of eval/questions.jsonl as typed records, so calibration and `make eval` read one set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

QUESTIONS = Path(__file__).with_name("questions.jsonl")

Kind = Literal["in_scope", "off_topic", "adversarial"]
Split = Literal["tune", "heldout"]
KINDS: tuple[Kind, ...] = ("in_scope", "off_topic", "adversarial")
SPLITS: tuple[Split, ...] = ("tune", "heldout")


@dataclass(frozen=True, slots=True)
class Question:
    """One labelled question: what a visitor typed and which knowledge-base entries answer it."""

    id: str
    text: str
    kind: Kind
    acceptable: tuple[str, ...]  # entry ids that answer it; empty for off-topic and adversarial questions
    style: str  # paraphrase, typo, long, fragment, multi (in scope); general, chitchat, task, injection, ... (others)
    split: Split  # "tune" may be used to calibrate; "heldout" is only ever measured

    @property
    def in_scope(self) -> bool:
        """Whether the knowledge base should answer it."""
        return self.kind == "in_scope"


def load(split: str | None = None, path: Path = QUESTIONS) -> list[Question]:
    """The questions of one split ("tune" or "heldout"; "held-out" is accepted too), or all of them, in file order."""
    wanted = None if split is None else split.replace("-", "").replace("_", "")
    if wanted is not None and wanted not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["kind"] not in KINDS or row["split"] not in SPLITS:
            raise ValueError(f"{path.name}:{number}: bad kind or split in {row!r}")
        question = Question(
            id=row["id"],
            text=row["text"],
            kind=cast(Kind, row["kind"]),
            acceptable=tuple(row["acceptable"]),
            style=row["style"],
            split=cast(Split, row["split"]),
        )
        if wanted is None or question.split == wanted:
            questions.append(question)
    return questions
