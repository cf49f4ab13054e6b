"""The escalation keywords' one-scan check finds a keyword exactly when searching for each one would."""

from __future__ import annotations

import random

from server.chat.escalation import EscalationRules
from server.settings import Settings

PIECES = ["urgent", "Urgent!", "xurgent", "urgentx", "cancel  my\taccount", "cancel my", "speak to a person", "REAL PERSON"]
PIECES += ["human", "humane", "ſupervisor", "a+b", "x.y", "xy", " ", "_", "-", "é", "agent007", "agent", "refunds"]


def test_one_scan_agrees_with_a_search_per_keyword() -> None:
    rules = EscalationRules((*Settings().escalation_keywords, "a+b", "x.y"), 0.5)

    def each(text: str) -> str | None:
        return next((keyword for keyword, pattern in rules._keywords if pattern.search(text)), None)

    rng = random.Random(3)
    for _ in range(20_000):
        text = "".join(rng.choice(PIECES) + rng.choice(["", " ", ".", "_"]) for _ in range(rng.randint(0, 5)))
        assert rules.keyword_in(text) == each(text), text
    assert EscalationRules((), 0.5).keyword_in("urgent") is None
