"""Excerpt expansion: `<excerpt>PREFIX<...>SUFFIX</excerpt>` -> the verbatim document span it names.

Our choices where the paper is silent, all tested:
- Matching is exact first, then tolerant of whitespace differences only (never of changed words).
- A compact excerpt resolves to the span from a PREFIX occurrence to the first SUFFIX occurrence after
  it. With several PREFIX occurrences (ambiguous), the shortest resulting span wins, ties to the one
  nearest the preferred offset (the window the instantiator read), then the earliest.
- An excerpt that cannot be found is an error for the whole pair (`excerpt_not_found`): no guessing.
- A span longer than `max_span_chars` is rejected (`excerpt_span_too_long`): a PREFIX/SUFFIX pair that
  only resolves across half a book is not a quotation.
- The excerpt ratio is measured in characters: characters of the expanded answer that were copied from
  the document, over all non-whitespace-trimmed characters of the expanded answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

EXCERPT = re.compile(r"<excerpt>(.*?)</excerpt>", re.DOTALL)
ELLIPSIS = "<...>"


class ExcerptError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Expansion:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    copied_chars: int = 0

    @property
    def ratio(self) -> float:
        n = len(self.text)
        return self.copied_chars / n if n else 0.0


def _occurrences(document: str, needle: str) -> list[tuple[int, int]]:
    """(start, end) of every occurrence: exact, else with whitespace runs matched loosely."""
    needle = needle.strip()
    if not needle:
        return []
    out = []
    pos = document.find(needle)
    while pos != -1:
        out.append((pos, pos + len(needle)))
        pos = document.find(needle, pos + 1)
    if out:
        return out
    words = needle.split()
    pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
    return [(m.start(), m.end()) for m in pattern.finditer(document)]


def resolve_excerpt(document: str, body: str, prefer: int = 0, max_span_chars: int = 4000) -> tuple[int, int]:
    if ELLIPSIS in body:
        prefix, _, suffix = body.partition(ELLIPSIS)
        suffix = suffix.replace(ELLIPSIS, " ")
        starts = _occurrences(document, prefix)
        if not starts:
            raise ExcerptError("excerpt_not_found", f"prefix {prefix.strip()[:80]!r} is not in the document")
        candidates = []
        for s, e in starts:
            if not suffix.strip():
                candidates.append((s, e))
                continue
            tail = _occurrences(document[e:], suffix)
            if tail:
                candidates.append((s, e + tail[0][1]))
        if not candidates:
            raise ExcerptError("excerpt_not_found", f"suffix {suffix.strip()[:80]!r} never follows the prefix")
    else:
        candidates = _occurrences(document, body)
        if not candidates:
            raise ExcerptError("excerpt_not_found", f"{body.strip()[:80]!r} is not in the document")
    best = min(candidates, key=lambda se: (se[1] - se[0], abs(se[0] - prefer), se[0]))
    if best[1] - best[0] > max_span_chars:
        raise ExcerptError("excerpt_span_too_long", f"{best[1] - best[0]} chars > {max_span_chars}")
    return best


def expand_answer(answer: str, document: str, prefer: int = 0, max_span_chars: int = 4000) -> Expansion:
    """Replace every excerpt tag with its document span; raises ExcerptError on any unresolvable one."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    copied = 0
    last = 0
    for m in EXCERPT.finditer(answer):
        pieces.append(answer[last : m.start()])
        s, e = resolve_excerpt(document, m.group(1), prefer, max_span_chars)
        pieces.append(document[s:e])
        spans.append((s, e))
        copied += e - s
        last = m.end()
    rest = answer[last:]
    if "<excerpt>" in rest or "</excerpt>" in rest:
        raise ExcerptError("unbalanced_excerpt_tags", "an excerpt tag is not closed")
    pieces.append(rest)
    raw = "".join(pieces)
    text = raw.strip()
    # Leading/trailing whitespace is trimmed; copied characters trimmed with it are not counted.
    trimmed_copied = copied - _trimmed_copied(raw, pieces, spans)
    return Expansion(text=text, spans=spans, copied_chars=max(0, trimmed_copied))


def _trimmed_copied(raw: str, pieces: list[str], spans: list[tuple[int, int]]) -> int:
    lead = len(raw) - len(raw.lstrip())
    trail = len(raw) - len(raw.rstrip())
    # Pieces alternate free text / copied text; walk them to see how much trimming fell on copies.
    removed = 0
    pos = 0
    for i, piece in enumerate(pieces):
        start, end = pos, pos + len(piece)
        pos = end
        if i % 2 == 1:
            removed += max(0, min(end, lead) - start)
            removed += max(0, end - max(start, len(raw) - trail))
    return removed
