"""Stage 3b, matching: each of a document's K+1 vectors proposes templates; one is sampled per vector.

- Candidates are templates whose description has cosine >= threshold with that vector.
- Sampling is complexity-weighted: a candidate with complexity c (number of <fi> tags) gets weight
  target(c) / bank(c), so chosen templates follow the target complexity distribution (the paper's: that
  of templates made from real chat prompts) rather than the bank's.
- One template per vector, never the same template twice per document, at most `max_templates`
  (the paper's 6 = one global + five local). A vector with no candidate above the threshold contributes
  nothing (the paper is silent); a document with no candidate at all is rejected with that reason.
- The random generator is seeded from (seed, document_id): reruns and reshardings give the same choice.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pandas as pd

from .ids import content_id


def complexity_weights(bank_complexity: list[int], target_complexity: list[int]) -> dict[int, float]:
    bank = Counter(bank_complexity)
    target = Counter(target_complexity) if target_complexity else bank
    nb, nt = sum(bank.values()), sum(target.values())
    weights = {}
    for c in bank:
        # Laplace smoothing: a complexity absent from the target is rare, not impossible.
        p_target = (target.get(c, 0) + 1) / (nt + len(bank))
        weights[c] = p_target / (bank[c] / nb)
    return weights


def _rng(seed: int, document_id: str) -> np.random.Generator:
    h = hashlib.sha256(f"{seed}:{document_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def sample_templates(
    sims: np.ndarray,
    ids: np.ndarray,
    complexity: np.ndarray,
    weights: dict[int, float],
    threshold: float,
    max_templates: int,
    rng: np.random.Generator,
) -> list[tuple[int, int, float]]:
    """sims/ids (K+1, k) from FAISS -> [(vector index, template row, similarity)] in vector order."""
    chosen: list[tuple[int, int, float]] = []
    taken: set[int] = set()
    for v in range(sims.shape[0]):
        if len(chosen) >= max_templates:
            break
        cand = [
            (int(i), float(s))
            for i, s in zip(ids[v], sims[v], strict=True)
            if i >= 0 and s >= threshold and int(i) not in taken
        ]
        if not cand:
            continue
        w = np.array([weights.get(int(complexity[i]), 1.0) for i, _ in cand], dtype=np.float64)
        pick = int(rng.choice(len(cand), p=w / w.sum()))
        row, sim = cand[pick]
        taken.add(row)
        chosen.append((v, row, sim))
    return chosen


def match_documents(
    doc_index: pd.DataFrame,
    templates: pd.DataFrame,
    sims: np.ndarray,
    ids: np.ndarray,
    weights: dict[int, float],
    threshold: float,
    max_templates: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """doc_index rows (document_id, corpus, chunk_char_centers) with per-document search results.

    sims/ids have shape (n_docs, K+1, k). Returns (template_matches, rejected documents).
    """
    complexity = templates["complexity"].to_numpy()
    rows, rejected = [], []
    for d, doc in enumerate(doc_index.itertuples(index=False)):
        chosen = sample_templates(
            sims[d], ids[d], complexity, weights, threshold, max_templates, _rng(seed, doc.document_id)
        )
        if not chosen:
            best = float(sims[d].max()) if sims[d].size else float("nan")
            rejected.append(
                {
                    "document_id": doc.document_id,
                    "corpus": doc.corpus,
                    "reason": "no_template_above_threshold",
                    "detail": f"best cosine {best:.3f} < {threshold}",
                }
            )
            continue
        for rank, (v, row, sim) in enumerate(chosen):
            t = templates.iloc[row]
            rows.append(
                {
                    "match_id": content_id("match", doc.document_id, t.template_id),
                    "document_id": doc.document_id,
                    "corpus": doc.corpus,
                    "template_id": t.template_id,
                    "chunk": v,
                    "chunk_char_center": int(doc.chunk_char_centers[v]),
                    "similarity": round(sim, 5),
                    "rank": rank,
                    "complexity": int(t.complexity),
                }
            )
    cols = [
        "match_id",
        "document_id",
        "corpus",
        "template_id",
        "chunk",
        "chunk_char_center",
        "similarity",
        "rank",
        "complexity",
    ]
    return pd.DataFrame(rows, columns=cols), pd.DataFrame(
        rejected, columns=["document_id", "corpus", "reason", "detail"]
    )
