"""Calibrate the matching similarity threshold for an embedder on labelled question/paragraph pairs.

A SQuAD question is compatible with its own paragraph (positive) and not with paragraphs of other
articles (negative). Each question is genericized by the configured genericizer; its description is
compared with every paragraph's K+1 Gaussian-pooled vectors (max over vectors, as matching does).
Prints the similarity distribution of positives and negatives and the threshold that maximises F1,
plus the thresholds reaching 0.5 / 0.8 recall.

    python benchmarks/calibrate_threshold.py --questions 60 --paragraphs 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fineinstructions_core import genericize
from fineinstructions_core.config import load_config
from fineinstructions_core.embed import Embedder
from fineinstructions_core.stages import llm_for

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "fineinstructions.yaml"))
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--paragraphs", type=int, default=40)
    ap.add_argument("--data-dir", default=None, help="where the request cache lives (default: the config's)")
    args = ap.parse_args()
    overrides = {"data_dir": args.data_dir} if args.data_dir else None
    cfg = load_config(args.config, overrides)
    paras = [json.loads(x) for x in open(ROOT / "sample_data/documents/squad_v2_half_paragraphs.jsonl")]
    # Spread over articles: every 14th paragraph.
    paras = paras[:: max(1, len(paras) // args.paragraphs)][: args.paragraphs]
    pids = {p["pid"]: i for i, p in enumerate(paras)}
    qs = [json.loads(x) for x in open(ROOT / "sample_data/eval/squad_v2_half_questions.jsonl")]
    qs = [q for q in qs if q["pid"] in pids and not q["is_impossible"]]
    rng = np.random.default_rng(0)
    qs = [qs[i] for i in sorted(rng.choice(len(qs), size=min(args.questions, len(qs)), replace=False))]

    t = time.perf_counter()
    spec = cfg.models["genericize"]
    llm = llm_for(cfg, "genericize")
    results = llm.generate([genericize.build_request(q["question"], spec.model, spec.max_new_tokens, 0.0) for q in qs])
    parsed = [genericize.parse_output(r.text) for r in results]
    keep = [(q, p[1]) for q, p in zip(qs, parsed, strict=True) if p and p[1].strip()]
    print(f"genericized {len(qs)} questions in {time.perf_counter() - t:.0f}s; {len(keep)} with a description")

    m = cfg.matching
    emb = Embedder(cfg.embedder)
    docs = emb.embed_documents([p["text"] for p in paras], int(m["k"]), float(m["sigma"]), float(m["alpha"]))
    D = np.stack([d.vectors for d in docs])  # (P, K+1, d)
    for label, texts in (
        ("genericized description", [d for _, d in keep]),
        ("raw question", [q["question"] for q, _ in keep]),
    ):
        Q = emb.embed_texts(texts)
        S = np.einsum("pkd,qd->pqk", D, Q).max(-1)  # (P, Q)
        pos, neg = [], []
        for j, (q, _) in enumerate(keep):
            own = pids[q["pid"]]
            art = paras[own]["title"]
            pos.append(S[own, j])
            neg += [S[i, j] for i, p in enumerate(paras) if p["title"] != art]
        pos, neg = np.array(pos), np.array(neg)
        best = max(np.arange(0.05, 0.8, 0.01), key=lambda th: _f1(pos, neg, th))
        print(f"\n[{label}] positives={len(pos)} negatives={len(neg)}")
        print("  positive percentiles 10/50/90:", np.round(np.percentile(pos, [10, 50, 90]), 3))
        print("  negative percentiles 50/90/99:", np.round(np.percentile(neg, [50, 90, 99]), 3))
        for th in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
            print(
                f"  threshold {th:.2f}: recall {np.mean(pos >= th):.3f}  false-positive rate {np.mean(neg >= th):.3f}"
            )
        print(f"  best-F1 threshold {best:.2f} (F1 {_f1(pos, neg, best):.3f})")


def _f1(pos: np.ndarray, neg: np.ndarray, th: float) -> float:
    tp, fp, fn = np.sum(pos >= th), np.sum(neg >= th), np.sum(pos < th)
    # Negatives outnumber positives; weight them to a 1:1 prior so F1 is not dominated by class sizes.
    fp = fp * len(pos) / max(len(neg), 1)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


if __name__ == "__main__":
    main()
