"""Stage 0, query collection: normalize, dedup, bound length, filter unsafe content, decontaminate.

Every dropped query is returned as a rejection with its reason; the order of checks is fixed so a query
carries exactly one reason: empty, too_short, too_long, unsafe, contaminated, duplicate.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import pandas as pd

from .ids import content_id

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_query(text: str) -> str:
    """NFKC, collapse whitespace, strip; case and punctuation are kept (they carry the user's style)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if ch == "\n" or ch == "\t" or unicodedata.category(ch)[0] != "C")
    return _WS.sub(" ", text).strip()


def dedup_key(text: str) -> str:
    """Exact-duplicate key: case- and punctuation-insensitive."""
    return " ".join(_WORD.findall(text.lower()))


def load_unsafe_patterns(path: str | Path | None = None) -> list[re.Pattern[str]]:
    if path:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    else:
        lines = (
            resources.files("fineinstructions_core")
            .joinpath("resources/unsafe_patterns.txt")
            .read_text(encoding="utf-8")
            .splitlines()
        )
    return [re.compile(line, re.IGNORECASE) for line in lines if line.strip() and not line.startswith("#")]


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Decontaminator:
    """Flags queries that share an n-gram of words with an evaluation question.

    A query shorter than n words is flagged when all of its words appear, in order and contiguous, in an
    evaluation question, but only from `min_words` words up, so "what is a" never matches everything.
    """

    def __init__(self, questions: Iterable[str], n: int = 8, min_words: int = 5):
        self.n = n
        self.min_words = min_words
        self.grams: set[tuple[str, ...]] = set()
        for q in questions:
            toks = _tokens(q)
            for size in range(min_words, n + 1):
                for i in range(len(toks) - size + 1):
                    self.grams.add(tuple(toks[i : i + size]))

    def contaminated(self, text: str) -> bool:
        toks = _tokens(text)
        if len(toks) < self.min_words:
            return False
        size = min(self.n, len(toks))
        return any(tuple(toks[i : i + size]) in self.grams for i in range(len(toks) - size + 1))


def load_eval_questions(paths: Iterable[Path], field: str = "question") -> list[str]:
    out: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        value = json.loads(line).get(field)
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    if isinstance(value, str):
                        out.append(value)
    return out


def build_query_set(
    raw: pd.DataFrame,
    min_chars: int,
    max_chars: int,
    unsafe: list[re.Pattern[str]],
    decontaminator: Decontaminator | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """raw (query_id, source, text) -> (query_set, rejections)."""
    kept, rejected = [], []
    seen: dict[str, str] = {}
    for row in raw.itertuples(index=False):
        query = normalize_query(row.text)
        reason, detail = None, ""
        if not query:
            reason = "empty"
        elif len(query) < min_chars:
            reason, detail = "too_short", f"{len(query)} < {min_chars} chars"
        elif len(query) > max_chars:
            reason, detail = "too_long", f"{len(query)} > {max_chars} chars"
        else:
            hit = next((p.pattern for p in unsafe if p.search(query)), None)
            if hit:
                reason, detail = "unsafe", hit
            elif decontaminator is not None and decontaminator.contaminated(query):
                reason = "contaminated"
            else:
                key = dedup_key(query)
                if key in seen:
                    reason, detail = "duplicate", f"duplicate of {seen[key]}"
                else:
                    seen[key] = row.query_id
        if reason:
            rejected.append(
                {
                    "query_id": row.query_id,
                    "source": row.source,
                    "text": row.text[:500],
                    "reason": reason,
                    "detail": detail,
                }
            )
        else:
            kept.append(
                {
                    "query_id": row.query_id,
                    "source": row.source,
                    "query": query,
                    "query_key": content_id("qk", dedup_key(query)),
                }
            )
    cols_out = ["query_id", "source", "query", "query_key"]
    cols_rej = ["query_id", "source", "text", "reason", "detail"]
    return pd.DataFrame(kept, columns=cols_out), pd.DataFrame(rejected, columns=cols_rej)
