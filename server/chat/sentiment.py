"""How upset a visitor's message reads, offline: VADER's lexicon ships inside its package (no network, no model)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachetools import LRUCache
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

SCORES_KEPT = 4096  # scores remembered per normalised text: visitors repeat themselves, and retries repeat exactly
SCORED_CHARS = 2000  # a longer message is scored on its first characters (the lexicon's cost grows with the text)

# Words of anger or insult aimed at the service or the assistant. VADER alone does not tell an upset visitor from a
# plain description of a problem ("I picked the wrong colour by mistake" scores lower than "you stupid bot"): a
# negative message with one of these reads upset; one without them only when it is very negative.
ANGER_WORDS = (
    "useless",
    "stupid",
    "idiot",
    "idiots",
    "idiotic",
    "dumb",
    "moron",
    "pathetic",
    "ridiculous",
    "unacceptable",
    "outrageous",
    "disgusting",
    "disgraceful",
    "incompetent",
    "rubbish",
    "garbage",
    "worst",
    "furious",
    "angry",
    "livid",
    "fed up",
    "sick of",
    "sick and tired",
    "frustrated",
    "frustrating",
    "shameful",
    "wtf",
    "crap",
    "shit",
)
ANGRY_AT_MOST = 0.0  # a message with words of anger reads upset unless VADER finds it positive ("not useless at all")
_ANGER_BODY = "|".join(r"\s+".join(map(re.escape, word.split())) for word in ANGER_WORDS)
_ANGER = re.compile(rf"(?<!\w)(?:{_ANGER_BODY})(?!\w)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Mood:
    """How a message reads: VADER's compound score, and whether it has words of anger or insult."""

    score: float
    angry_words: bool


class SentimentReader:
    """VADER's compound score (-1 very negative .. 1 very positive) per message, kept in a bounded LRU.

    VADER reads English: capitals, "!!!", "not happy", emoji and insults all count; other languages score
    near 0 (neutral), so they never escalate on sentiment by mistake.
    """

    def __init__(self, kept: int = SCORES_KEPT) -> None:
        self._analyzer = SentimentIntensityAnalyzer()  # reads the lexicon files beside the module, once
        self._moods: LRUCache[str, Mood] = LRUCache(kept)

    def read(self, text: str) -> Mood:
        """The mood of one message (neutral for a blank one)."""
        key = " ".join(text[:SCORED_CHARS].split())  # case and "!" matter to VADER: only whitespace is normalised
        if not key:
            return NEUTRAL
        known = self._moods.get(key)
        if known is not None:
            return known
        mood = Mood(float(self._analyzer.polarity_scores(key)["compound"]), _ANGER.search(key) is not None)
        self._moods[key] = mood
        return mood


NEUTRAL = Mood(0.0, False)
