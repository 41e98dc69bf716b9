"""Stage 6, budget and format: per document, tokens of kept pairs <= tokens of the document.

Documents are visited in a fixed order; a document's unused budget rolls over to the next document of
the same corpus, so short documents with many good pairs are not starved by a hard per-document cap.
Within a document pairs go best-judged first (score, then excerpt ratio, then pair id).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

FORMAT = "Instruction: {instruction}\n\nAnswer: {answer}"


def format_pair(instruction: str, answer: str) -> str:
    return FORMAT.format(instruction=instruction, answer=answer)


def apply_budget(
    pairs: pd.DataFrame,
    doc_tokens: dict[str, int],
    count_tokens: Callable[[str], int],
    rollover: bool = True,
    budget_ratio: float = 1.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """pairs (judged, accepted) -> (training rows with text and tokens, rejections `over_budget`)."""
    pairs = pairs.copy()
    if pairs.empty:
        pairs = pd.DataFrame(columns=[*pairs.columns, "text", "tokens"])
        return pairs, pd.DataFrame(columns=[*pairs.columns, "reason", "detail"])
    pairs["text"] = [format_pair(i, a) for i, a in zip(pairs["instruction"], pairs["answer"], strict=True)]
    pairs["tokens"] = [count_tokens(t) for t in pairs["text"]]
    kept, rejected = [], []
    carry: dict[str, int] = {}
    corpus_of = dict(zip(pairs["document_id"], pairs["corpus"], strict=True))
    for doc_id in sorted(corpus_of, key=lambda d: (corpus_of[d], d)):
        group = pairs[pairs["document_id"] == doc_id].sort_values(
            ["score", "excerpt_ratio", "pair_id"], ascending=[False, False, True]
        )
        corpus = group["corpus"].iloc[0]
        budget = int(doc_tokens.get(doc_id, 0) * budget_ratio) + (carry.get(corpus, 0) if rollover else 0)
        for row in group.to_dict("records"):
            if row["tokens"] <= budget:
                budget -= row["tokens"]
                kept.append(row)
            else:
                rejected.append(row | {"reason": "over_budget", "detail": f"{row['tokens']} tokens > {budget} left"})
        carry[corpus] = budget
    return pd.DataFrame(kept, columns=list(pairs.columns)), pd.DataFrame(
        rejected, columns=list(pairs.columns) + ["reason", "detail"]
    )
