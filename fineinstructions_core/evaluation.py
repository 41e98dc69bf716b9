"""Measuring template-to-document matching on labelled question/paragraph data.

A question asked about a paragraph is a template compatible with that paragraph. We build a template bank
from the questions, index it, embed the paragraphs as the matching stage does, and ask how highly each
paragraph ranks its own questions:

- `recall@k` = |own questions in the top k| / min(|own questions|, k), so a perfect ranking scores 1.0
  whatever the number of own questions; averaged over paragraphs with at least one own question.
- `mrr` = mean of 1 / rank of the first own question (0 when it is not in the top `depth`).
- pooling `global` ranks by the global vector alone; `gaussian` by the best similarity over the global
  and K local vectors (as matching proposes candidates from every vector).
- `unanswerable`: questions marked impossible are indexed too, as hard negatives; we report how often a
  paragraph's own unanswerable questions are retrieved in its top 10 and above the threshold.

`calibrate_threshold` proposes a similarity threshold for any embedder from the same kind of data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embed import Embedder, PooledDocument

KS = (1, 5, 10)


@dataclass
class LabelledSet:
    questions: list[str]
    question_pids: list[str]
    impossible: list[bool]
    pids: list[str]
    texts: list[str]
    titles: list[str | None]


def load_labelled_set(
    questions_path: Path,
    paragraphs_path: Path,
    question_field: str = "question",
    link_field: str = "pid",
    paragraph_id_field: str = "pid",
    paragraph_text_field: str = "text",
    impossible_field: str = "is_impossible",
    limit: int | None = None,
    title_field: str = "title",
    spread: int | None = None,
    max_questions: int | None = None,
    seed: int = 0,
) -> LabelledSet:
    """Paragraphs and the questions linked to them; unusable lines are skipped.

    `limit` keeps the first N paragraphs; `spread` keeps N paragraphs evenly spaced over the file (so a
    file sorted by article yields many articles); `max_questions` keeps a seeded sample of questions.
    """
    pids, texts, titles = [], [], []
    for line in _lines(paragraphs_path):
        try:
            obj = json.loads(line)
            pid, text = str(obj[paragraph_id_field]), obj[paragraph_text_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if not isinstance(text, str) or not text.strip():
            continue
        pids.append(pid)
        texts.append(text)
        titles.append(obj.get(title_field))
        if limit is not None and len(pids) >= limit:
            break
    if spread is not None and len(pids) > spread:
        step = len(pids) // spread
        keep = list(range(0, len(pids), step))[:spread]
        pids, texts, titles = [pids[i] for i in keep], [texts[i] for i in keep], [titles[i] for i in keep]
    known = set(pids)
    qs, qp, imp = [], [], []
    for line in _lines(questions_path):
        try:
            obj = json.loads(line)
            q, pid = obj[question_field], str(obj[link_field])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if pid in known and isinstance(q, str) and q.strip():
            qs.append(q)
            qp.append(pid)
            imp.append(bool(obj.get(impossible_field)))
    if max_questions is not None and len(qs) > max_questions:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(qs), size=max_questions, replace=False))
        qs, qp, imp = [qs[i] for i in keep], [qp[i] for i in keep], [imp[i] for i in keep]
    if not pids:
        raise ValueError(f"no usable paragraph in {paragraphs_path} (field {paragraph_text_field!r})")
    if not qs:
        raise ValueError(f"no question in {questions_path} links to these paragraphs via {link_field!r}")
    return LabelledSet(qs, qp, imp, pids, texts, titles)


def subset_by_titles(
    data: LabelledSet, titles: Sequence[str], keep: bool = True, max_questions: int | None = None, seed: int = 0
) -> LabelledSet:
    """Only the paragraphs (and their questions) whose article title is (keep) or is not in `titles`,
    e.g. the articles held out from embedding training."""
    wanted = set(titles)
    idx = [i for i, t in enumerate(data.titles) if (t in wanted) == keep]
    pids = [data.pids[i] for i in idx]
    known = set(pids)
    q = [i for i, p in enumerate(data.question_pids) if p in known]
    if max_questions is not None and len(q) > max_questions:
        q = sorted(np.random.default_rng(seed).choice(q, size=max_questions, replace=False).tolist())
    if not idx or not q:
        raise ValueError(f"no labelled paragraph or question left after selecting titles {sorted(wanted)[:5]}")
    return LabelledSet(
        [data.questions[i] for i in q],
        [data.question_pids[i] for i in q],
        [data.impossible[i] for i in q],
        pids,
        [data.texts[i] for i in idx],
        [data.titles[i] for i in idx],
    )


def _lines(path: Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line


def ranking_metrics(ranked: list[list[int]], relevant: list[set[int]], depth: int = 10) -> dict[str, float]:
    """recall@1/5/10 (normalised by min(|relevant|, k)) and MRR over queries with relevant items."""
    sums = dict.fromkeys([f"recall@{k}" for k in KS] + ["mrr"], 0.0)
    n = 0
    for order, rel in zip(ranked, relevant, strict=True):
        if not rel:
            continue
        n += 1
        for k in KS:
            sums[f"recall@{k}"] += len(rel & set(order[:k])) / min(len(rel), k)
        rank = next((i + 1 for i, t in enumerate(order[:depth]) if t in rel), None)
        sums["mrr"] += 1.0 / rank if rank else 0.0
    return {k: round(v / n, 4) if n else 0.0 for k, v in sums.items()} | {"paragraphs": n}


def _rank(sims: np.ndarray, depth: int) -> list[int]:
    """Templates ordered by similarity, ties broken by template index for determinism."""
    order = np.lexsort((np.arange(sims.shape[0]), -sims))
    return [int(i) for i in order[:depth]]


def evaluate(
    data: LabelledSet,
    descriptions: list[str],
    keep: list[bool],
    embedder: Embedder,
    pooled: list[PooledDocument],
    threshold: float,
    depth: int = 10,
) -> dict[str, Any]:
    """Metrics for one bank of descriptions (one per question; `keep` False for failed ones)."""
    idx = [i for i, k in enumerate(keep) if k]
    T = embedder.embed_texts([descriptions[i] for i in idx])  # (n_templates, d)
    pid_pos = {p: j for j, p in enumerate(data.pids)}
    own: list[set[int]] = [set() for _ in data.pids]
    own_impossible: list[set[int]] = [set() for _ in data.pids]
    for t, qi in enumerate(idx):
        target = own_impossible if data.impossible[qi] else own
        target[pid_pos[data.question_pids[qi]]].add(t)
    result: dict[str, Any] = {}
    unanswerable: dict[str, Any] = {}
    for pooling in ("global", "gaussian"):
        ranked, sims_best = [], []
        for doc in pooled:
            vecs = doc.vectors[:1] if pooling == "global" else doc.vectors
            s = (vecs @ T.T).max(axis=0)
            sims_best.append(s)
            # Unanswerable templates take part in the ranking but never count as relevant.
            ranked.append(_rank(s, depth))
        result[pooling] = ranking_metrics(ranked, own, depth)
        n_imp = sum(len(x) for x in own_impossible)
        in_top = sum(len(x & set(r[:10])) for x, r in zip(own_impossible, ranked, strict=True))
        above = sum(int(np.sum(s[list(x)] >= threshold)) for x, s in zip(own_impossible, sims_best, strict=True) if x)
        unanswerable[pooling] = {
            "questions": n_imp,
            "in_top10_rate": round(in_top / n_imp, 4) if n_imp else 0.0,
            "above_threshold_rate": round(above / n_imp, 4) if n_imp else 0.0,
        }
    result["templates"] = len(idx)
    return {"metrics": result, "unanswerable": unanswerable}


def calibrate_threshold(
    data: LabelledSet,
    descriptions: list[str],
    keep: list[bool],
    embedder: Embedder,
    pooled: list[PooledDocument],
    grid: tuple[float, float, float] = (0.05, 0.8, 0.01),
) -> dict[str, Any]:
    """Best-F1 threshold separating a question's own paragraph from paragraphs of other articles.

    Similarity is the max over the document's K+1 vectors, as matching uses it. Negatives outnumber
    positives, so false positives are reweighted to a 1:1 prior before F1.
    """
    idx = [i for i, k in enumerate(keep) if k and not data.impossible[i]]
    if not idx:
        raise ValueError("no answerable question with a description to calibrate on")
    T = embedder.embed_texts([descriptions[i] for i in idx])
    D = np.stack([d.vectors for d in pooled])  # (P, K+1, d)
    S = np.einsum("pkd,qd->pqk", D, T).max(-1)  # (P, Q)
    pid_pos = {p: j for j, p in enumerate(data.pids)}
    group = [data.titles[j] or data.pids[j] for j in range(len(data.pids))]
    pos, neg = [], []
    for col, qi in enumerate(idx):
        own = pid_pos[data.question_pids[qi]]
        pos.append(S[own, col])
        neg.extend(S[j, col] for j in range(len(data.pids)) if group[j] != group[own])
    pos_a, neg_a = np.array(pos), np.array(neg)
    if not len(neg_a):
        raise ValueError("calibration needs paragraphs from at least two articles (titles) as negatives")

    def f1(th: float) -> float:
        tp, fn = np.sum(pos_a >= th), np.sum(pos_a < th)
        fp = np.sum(neg_a >= th) * len(pos_a) / len(neg_a)
        return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0

    grid_values = np.arange(*grid)
    best = float(max(grid_values, key=f1))
    table = [
        {
            "threshold": round(float(t), 2),
            "recall": round(float(np.mean(pos_a >= t)), 4),
            "false_positive_rate": round(float(np.mean(neg_a >= t)), 4),
        }
        for t in np.arange(0.1, 0.61, 0.05)
    ]
    return {
        "proposed_threshold": round(best, 2),
        "f1": round(f1(best), 4),
        "positives": int(len(pos_a)),
        "negatives": int(len(neg_a)),
        "table": table,
    }


def _articles(data: LabelledSet) -> dict[str, list[int]]:
    """Each article's paragraph indices in order, keyed by its title (a paragraph without one is its own)."""
    by_title: dict[str, list[int]] = {}
    for j, t in enumerate(data.titles):
        by_title.setdefault(t or data.pids[j], []).append(j)
    return by_title


def _joined(data: LabelledSet, members: list[int]) -> tuple[str, dict[str, tuple[int, int]]]:
    """An article's paragraphs joined by blank lines, and each paragraph's character span in the result."""
    text, spans = "", {}
    for j in members:
        start = len(text) + (2 if text else 0)
        text = f"{text}\n\n{data.texts[j]}" if text else data.texts[j]
        spans[data.pids[j]] = (start, len(text))
    return text, spans


def concatenated_articles(data: LabelledSet) -> LabelledSet:
    """Each article's paragraphs joined into one long document, its questions linked to it: matching
    on long documents, where local vectors should help."""
    by_title = _articles(data)
    article_of = {data.pids[j]: title for title, members in by_title.items() for j in members}
    titles = list(by_title)
    return LabelledSet(
        list(data.questions),
        [article_of[p] for p in data.question_pids],
        list(data.impossible),
        titles,
        [_joined(data, by_title[t])[0] for t in titles],
        titles,
    )


def long_document_coverage(
    data: LabelledSet,
    embedder: Embedder,
    K: int,
    sigma: float,
    alpha: float,
    answers: dict[int, str] | None = None,
    min_tokens: int | None = None,
    min_width: float = 0.0,
) -> dict[str, Any]:
    """Do local vectors of a long document retrieve templates about their own part of it?

    Each article's paragraphs are joined into one long document; each answerable question is placed at
    the position of its paragraph (or of its answer text, when given) in that document. For every local
    vector k we take its best question and compare where that question points with the vector's centre
    k/(K+1). Reports the Pearson correlation over all (centre, position) pairs and the mean distance.
    """
    joined = [_joined(data, members) for members in _articles(data).values()]
    docs, spans = [t for t, _ in joined], [p for _, p in joined]
    pooled = embedder.embed_documents(docs, K, sigma, alpha, min_width=min_width)
    min_tokens = min_tokens or embedder.window
    q_idx = [i for i, imp in enumerate(data.impossible) if not imp]
    Q = embedder.embed_texts([data.questions[i] for i in q_idx])
    centres, positions = [], []
    for doc, pos, pd_ in zip(docs, spans, pooled, strict=True):
        if pd_.n_tokens < min_tokens:
            continue
        members = [(c, qi) for c, qi in enumerate(q_idx) if data.question_pids[qi] in pos]
        if not members:
            continue
        cols = [c for c, _ in members]
        sims = pd_.vectors[1:] @ Q[cols].T  # (K, members)
        for k in range(K):
            c, qi = members[int(np.argmax(sims[k]))]
            start, end = pos[data.question_pids[qi]]
            where = (start + end) / 2
            if answers and qi in answers:
                found = doc.find(answers[qi], start, end)
                where = found + len(answers[qi]) / 2 if found >= 0 else where
            centres.append((k + 1) / (K + 1))
            positions.append(where / len(doc))
    if len(centres) < 3:
        return {"documents": 0, "note": "no document longer than the embedder window"}
    c, p = np.array(centres), np.array(positions)
    return {
        "documents": len(centres) // K,
        "local_vectors": len(centres),
        "correlation": round(float(np.corrcoef(c, p)[0, 1]), 4),
        "mean_abs_distance": round(float(np.mean(np.abs(c - p))), 4),
        "by_chunk_mean_position": [round(float(np.mean(p[k::K])), 4) for k in range(K)],
    }


DescribeFn = Callable[[list[str]], tuple[list[str], list[bool]]]
