"""The visitor's language, offline: lingua's models ship inside its wheel, nothing is fetched.

Short messages ("ok", "password reset") are unreliable, so a detection counts only when it is confident: the
session keeps the language it had (recorded in Redis with the session, see append.lua) until a message says
otherwise clearly. English is what the session has until then.
"""

from __future__ import annotations

import threading
from functools import cache

from cachetools import LRUCache
from lingua import IsoCode639_1, LanguageDetector, LanguageDetectorBuilder

DETECTIONS_KEPT = 4096  # results remembered per normalised text
DETECTED_CHARS = 500  # the first characters are enough to tell a language apart, and bound the cost


@cache
def _detector(codes: tuple[str, ...], low_accuracy: bool) -> LanguageDetector:
    """One detector per configuration and process: lingua's models are large (tens of MB per language)."""
    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*(IsoCode639_1.from_str(code) for code in codes))
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


class LanguageDetection:
    """Tells which of a few languages a message is in, or None when it can't tell confidently.

    Confident means the best language's confidence is at least `min_confidence`, or it leads the second by
    `min_margin` (lingua's confidences are relative among the configured languages).
    """

    def __init__(self, codes: tuple[str, ...], *, min_confidence: float, min_margin: float, low_accuracy: bool = False) -> None:
        known = tuple(dict.fromkeys(code for code in codes if code))
        for code in known:
            IsoCode639_1.from_str(code)  # an unknown code fails at start-up, not on a visitor's message
        self.codes = known
        self._min_confidence = min_confidence
        self._min_margin = min_margin
        self._low_accuracy = low_accuracy
        self._results: LRUCache[str, str | None] = LRUCache(DETECTIONS_KEPT)

    @property
    def enabled(self) -> bool:
        """Whether there is anything to tell apart (two languages or more)."""
        return len(self.codes) > 1

    def warm_up(self) -> None:
        """Load the models in a background thread at start-up, so the first visitor does not wait for them."""
        if self.enabled:
            threading.Thread(target=self.detect, args=("warm up the language models",), daemon=True).start()

    def detect(self, text: str) -> str | None:
        """The message's ISO 639-1 code when the detection is confident, else None (keep the session's)."""
        if not self.enabled:
            return None
        key = " ".join(text[:DETECTED_CHARS].split()).lower()
        if not any(ch.isalpha() for ch in key):
            return None
        if key in self._results:
            return self._results[key]
        values = _detector(self.codes, self._low_accuracy).compute_language_confidence_values(key)
        found: str | None = None
        if values:
            best = values[0].value
            second = values[1].value if len(values) > 1 else 0.0
            if best >= self._min_confidence or best - second >= self._min_margin:
                found = values[0].language.iso_code_639_1.name.lower()
        self._results[key] = found
        return found
