"""An answer's sources: the knowledge-base entries it cites as `[n]`, checked against what the message retrieved.

The system prompt lists the retrieved entries as `[1]`, `[2]`, ... (`PromptBuilder.listed`: the first of
`Retrieval.matches`, none for off-topic or small talk) and asks the model to cite the ones it used. Only the final
text is read (a marker split across streamed chunks is whole there). A cited number that was in the prompt becomes a
source; any other is a citation of an entry the model was never shown, so it is dropped from the text and reported,
never listed. The markers left are renumbered in order of first citation, so that in the stored message `[n]` is
always `sources[n - 1]`: the page renders them as footnotes with no other key, and history reads the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from server.ai.knowledge import KnowledgeEntry
from server.ai.retrieval import Source

# `[1]`, `[1, 3]`, `[1,2,3]`; at most two digits (no prompt lists a hundred entries, and `[2024]` is not a citation),
# never a Markdown link's text (`[1](https://...)`). The blanks before a marker go with it when it is dropped.
_MARKER = re.compile(r"(?P<blank>[ \t]*)\[(?P<numbers>\d{1,2}(?:[ \t]*,[ \t]*\d{1,2})*)\](?!\()")
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True, slots=True)
class Cited:
    """An answer's text with its markers renumbered, its sources, and the cited numbers that were not in the prompt."""

    text: str
    sources: tuple[Source, ...]
    unknown: tuple[int, ...] = ()


def cite(text: str, listed: Sequence[KnowledgeEntry] | None, given: Sequence[Source] = ()) -> Cited:
    """The sources of one answer whose prompt numbered `listed` as `[1]`, `[2]`, ...

    `given`: the sources the provider reported itself (the offline one knows the entry it answered with); they are
    taken as they are and the text is left alone. `listed` None: nobody knows what the prompt listed, so the text
    is left alone and there are no sources.
    """
    if given:
        return Cited(text, tuple(dict.fromkeys(given)))
    if listed is None or "[" not in text:
        return Cited(text, ())
    order: dict[str, int] = {}  # entry id -> its footnote number (order of first citation)
    sources: list[Source] = []
    unknown: list[int] = []

    def renumber(marker: re.Match[str]) -> str:
        numbers: list[int] = []
        for digits in _NUMBER.findall(marker["numbers"]):
            n = int(digits)
            if not 1 <= n <= len(listed):
                unknown.append(n)
                continue
            entry = listed[n - 1]
            if entry.id not in order:
                order[entry.id] = len(sources) + 1
                sources.append(Source.of(entry))
            if order[entry.id] not in numbers:
                numbers.append(order[entry.id])
        if not numbers:
            return ""
        return marker["blank"] + "".join(f"[{n}]" for n in numbers)

    rewritten = _MARKER.sub(renumber, text)
    return Cited(rewritten, tuple(sources), tuple(unknown))
