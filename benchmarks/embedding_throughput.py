"""Embedding throughput of documents with Gaussian pooling (K+1 vectors) versus plain mean pooling.

Both poolings run on the same documents in the same process, alternating, each repeated; the figure is
the median time. Documents are the shipped sample (SQuAD paragraphs, Debian handbook pages, and one
Gutenberg book), so short and very long documents are both represented.

    python benchmarks/embedding_throughput.py [--repeats 3] [--docs 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fineinstructions_core.embed import Embedder

ROOT = Path(__file__).resolve().parent.parent / "sample_data" / "documents"


def load_documents(n: int) -> list[str]:
    docs = [json.loads(x)["text"] for x in open(ROOT / "squad_v2_half_paragraphs.jsonl")][: n // 2]
    docs += [json.loads(x)["text"] for x in open(ROOT / "debian-handbook.jsonl")][: n // 2]
    docs.append((ROOT / "gutenberg" / "11-0.txt").read_text(encoding="utf-8"))
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    docs = load_documents(args.docs)
    emb = Embedder()
    tokens = sum(len(emb.tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"]) for d in docs)
    emb.embed_documents(docs[:4], args.k, 0.05, 1.0)  # warm-up
    times: dict[str, list[float]] = {"mean": [], "gaussian": []}
    for _ in range(args.repeats):
        for pooling in ("mean", "gaussian"):
            t = time.perf_counter()
            emb.embed_documents(docs, args.k, 0.05, 1.0, pooling=pooling)
            times[pooling].append(time.perf_counter() - t)
    print(f"{len(docs)} documents, {tokens} tokens, window {emb.window}, K={args.k}, repeats={args.repeats}")
    print(f"{'pooling':10s} {'median s':>9s} {'docs/s':>8s} {'tokens/s':>9s}")
    for pooling, ts in times.items():
        m = statistics.median(ts)
        print(f"{pooling:10s} {m:9.2f} {len(docs) / m:8.1f} {tokens / m:9.0f}")
    overhead = statistics.median(times["gaussian"]) / statistics.median(times["mean"]) - 1
    print(f"Gaussian pooling overhead over mean pooling: {overhead * 100:+.1f}% of embedding time")


if __name__ == "__main__":
    main()
