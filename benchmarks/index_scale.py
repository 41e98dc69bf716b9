"""Template index at scale: exact vs approximate FAISS indexes on synthetic sentence-embedding-like vectors.

For each bank size N, builds every index in its own subprocess (so each peak RSS is measured alone) from
vectors generated batch by batch (never all in memory but inside the index), then measures build time,
search throughput (queries/s, k=10, best of a few runs), recall@10 against the exact index's answers, peak
RSS (VmHWM) and the saved file size. Each index is written and searched as the pipeline does it
(`write_index_from_batches` in one process, `load_index` memory-mapped and `search` in another, as the
template_index and matching steps run); after searching, the search process's RSS is split into its
private memory ("anon MB") and the index pages it has mapped ("mapped MB").
"x exact" divides by the exact index's throughput timed
in the same worker right after (the "exact qps" column), so both see the same load on a shared machine.

Where exact vectors would not fit in memory (more than EXACT_IN_MEMORY_BYTES), the ground truth is
exact search streamed over the regenerated batches, its throughput timed on the search alone; the
paper's bank size is such a case (18M x 384-d fp32 = 28 GB):

    python benchmarks/index_scale.py --paper-scale        # 18M vectors, the compressed index, ~30 min

The data: a seeded Gaussian mixture in 384-d (1,000 clusters of uneven size, a shared mean direction,
low-rank within-cluster variation plus isotropic noise), L2-normalised, like all-MiniLM-L6-v2 description
embeddings (random pairs have cosine ~0.1, nearest neighbours ~0.7); the queries are held-out draws.

    python benchmarks/index_scale.py --sizes 100000 1000000 --queries 1000
    python benchmarks/index_scale.py --sizes 100000 --families flat ivf hnsw ivfpq --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fineinstructions_core.index import (  # noqa: E402  (the script runs from a checkout)
    auto_nlist,
    build_index_from_batches,
    configure_search,
    load_index,
    resolve_factory,
    search,
    write_index_from_batches,
)

DIM = 384
K = 10
CLUSTERS = 1_000
LOW_RANK = 48
BATCH = 20_000
RECALL_TARGET = 0.95
SPEEDUP_TARGET = 20.0
PAPER_PEAK_MB, PAPER_RECALL, PAPER_QPS = 8_000, 0.90, 1_000
_COMPRESSED_SWEEP = tuple({"nprobe": p, "k_factor": k} for p, k in ((16, 20), (16, 40), (32, 40), (32, 80), (64, 80)))
PAPER_SCALE = 18_000_000  # templates in the released FineTemplates bank
EXACT_IN_MEMORY_BYTES = 4 * 2**30
# Search settings swept per family (one build each); the factory gets the automatic nlist.
FAMILIES: dict[str, tuple[str, tuple[dict[str, int], ...]]] = {
    "flat": ("Flat", ({},)),
    "ivf": ("IVF{nlist},Flat", tuple({"nprobe": v} for v in (4, 8, 12, 16, 32))),
    "hnsw": ("HNSW32", tuple({"ef_search": v} for v in (32, 64, 128, 256))),
    "ivfpq": ("IVF{nlist},PQ48", tuple({"nprobe": v} for v in (16, 64))),
    "compressed": ("compressed", _COMPRESSED_SWEEP),
    # The same with 6-bit re-ranking codes: a 25% smaller file, for banks whose mapped pages must stay small.
    "compressed-sq6": ("IVF{nlist}_HNSW32,PQ{fs}x4fs,Refine(SQ6)", _COMPRESSED_SWEEP),
}


# -------------------------------------------------------------------------------------------- data


class Mixture:
    """A seeded Gaussian mixture whose batches can be regenerated identically in any process."""

    def __init__(self, seed: int = 0, dim: int = DIM) -> None:
        rng = np.random.default_rng(seed)
        self.seed, self.dim = seed, dim
        mean = _unit(rng.standard_normal(dim))
        self.centers = _unit(_unit(rng.standard_normal((CLUSTERS, dim))) + 0.5 * mean).astype(np.float32)
        self.weights = rng.dirichlet(np.ones(CLUSTERS))
        # Within-cluster variation mostly along a few shared directions, as in real embeddings.
        self.basis = np.linalg.qr(rng.standard_normal((dim, LOW_RANK)))[0].T.astype(np.float32)

    def batch(self, stream: int, start: int, size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, start])
        c = rng.choice(CLUSTERS, size=size, p=self.weights)
        # float32 throughout, in place: a (size, dim) float64 temporary would dominate the peak RSS.
        x = rng.standard_normal((size, self.dim), dtype=np.float32)
        x *= 0.4 / self.dim**0.5  # isotropic noise
        x += self.centers[c]
        x += (rng.standard_normal((size, LOW_RANK), dtype=np.float32) @ self.basis) * (0.8 / LOW_RANK**0.5)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def batches(self, n: int, stream: int = 0) -> Iterator[np.ndarray]:
        for start in range(0, n, BATCH):
            yield self.batch(stream, start, min(BATCH, n - start))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------ worker


def _status_mb(field: str) -> float:
    """A /proc/self/status memory figure in MB: VmHWM (the RSS high-water mark, which counts FAISS's C++
    allocations that tracemalloc misses) or VmRSS (now, memory-mapped pages touched included)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _time_search(
    index, queries: np.ndarray, min_runs: int = 3, min_seconds: float = 2.0, max_runs: int = 10
) -> tuple[float, np.ndarray]:
    """Best-of-runs throughput (on a shared machine the fastest run is the least disturbed one), through
    the matching stage's own `search`."""
    search(index, queries[: min(100, len(queries))], K)  # warm-up: page faults, thread pool
    best, total, runs, ids = float("inf"), 0.0, 0, None
    while runs < min_runs or (total < min_seconds and runs < max_runs):
        t0 = time.perf_counter()
        _, ids = search(index, queries, K)
        dt = time.perf_counter() - t0
        best, total, runs = min(best, dt), total + dt, runs + 1
    return len(queries) / best, ids


def _setting(values: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "-"


def exact_stream(spec: dict) -> dict:
    """Exact top-k of the queries over all n vectors, streamed batch by batch (a FAISS result heap keeps
    the best k so far), so no more than one batch is ever held; only the search time is timed."""
    import faiss

    if spec["threads"]:
        faiss.omp_set_num_threads(spec["threads"])
    data = Mixture(spec["seed"])
    queries = np.concatenate(list(data.batches(spec["queries"], stream=1)))
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    search_s, start = 0.0, 0
    t_all = time.perf_counter()
    for batch in data.batches(spec["n"]):
        t0 = time.perf_counter()
        dist, ids = faiss.knn(queries, batch, K, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(dist, ids + start)
        search_s += time.perf_counter() - t0
        start += len(batch)
    heap.finalize()
    np.save(spec["truth"], heap.I)
    return {
        "family": "flat",
        "index": "exact stream",
        "factory": "Flat",
        "n": spec["n"],
        "build_s": time.perf_counter() - t_all - search_s,  # generating the vectors
        "base_mb": 0.0,
        "peak_mb": _peak_rss_mb(),
        "search_mb": _status_mb("VmRSS"),
        "index_mb": 0.0,
        "exact_qps": len(queries) / search_s,
        "threads": faiss.omp_get_max_threads(),
        "rows": [{"param": "-", "qps": len(queries) / search_s, "recall": 1.0}],
    }


def worker(spec: dict) -> dict:
    """One phase for one index over spec['n'] vectors, as the pipeline runs it: "build" writes the index
    (the template_index step), "search" loads it memory-mapped and sweeps its settings (the matching
    step, a process of its own), so each phase's peak RSS is its own."""
    import faiss

    if spec["family"] == "flat" and spec["stream_exact"]:
        return exact_stream(spec)
    if spec["threads"]:
        faiss.omp_set_num_threads(spec["threads"])
    data = Mixture(spec["seed"])
    n, path = spec["n"], Path(spec["index_path"])
    if spec["phase"] == "build":
        train = spec["train_size"]
        sample = np.concatenate(list(data.batches(train, stream=2))) if train else None
        t0 = time.perf_counter()
        index = write_index_from_batches(
            data.batches(n), DIM, n, path, exact_below=0, factory=spec["factory"], train_sample=sample
        )
        return {
            "index": type(index).__name__,
            "build_s": time.perf_counter() - t0,
            "build_peak_mb": _peak_rss_mb(),
            "index_mb": path.stat().st_size / 2**20,
            "threads": faiss.omp_get_max_threads(),
        }
    queries = np.concatenate(list(data.batches(spec["queries"], stream=1)))
    base_mb = _peak_rss_mb()
    index = load_index(path)
    truth = np.load(spec["truth"]) if spec["truth"] and os.path.exists(spec["truth"]) else None
    rows = []
    for values in spec["values"]:
        configure_search(index, **values)
        qps, ids = _time_search(index, queries)
        if truth is None:  # the exact index: its answers are the ground truth
            np.save(spec["truth"], ids)
            recall = 1.0
        else:
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth, strict=True)]))
        rows.append({"param": _setting(values), "qps": qps, "recall": recall})
    result = {
        "base_mb": base_mb,
        "peak_mb": _peak_rss_mb(),
        "search_anon_mb": _status_mb("RssAnon"),
        "search_mapped_mb": _status_mb("RssFile"),
        "rows": rows,
    }
    del index
    if truth is None:
        result["exact_qps"] = rows[0]["qps"]
    elif spec["exact_qps"]:
        result["exact_qps"] = spec["exact_qps"]  # from the streamed exact search: the vectors do not fit
    else:
        # The exact baseline again, in this process right after: both timings see the same machine load.
        exact = build_index_from_batches(data.batches(n), DIM, n, exact_below=n + 1)
        result["exact_qps"], _ = _time_search(exact, queries)
    return result


def build_and_search(spec: dict) -> dict:
    """The build phase, then the search phase, each in a fresh interpreter; the index file is removed."""
    if spec["family"] == "flat" and spec["stream_exact"]:
        return run_one(spec)
    path = Path(spec["tmpdir"]) / f"{spec['family']}_{spec['n']}.faiss"
    spec = spec | {"index_path": str(path)}
    try:
        built = run_one(spec | {"phase": "build"})
        searched = run_one(spec | {"phase": "search"})
    finally:
        path.unlink(missing_ok=True)
    return {
        "family": spec["family"],
        "factory": resolve_factory(spec["n"], DIM, 0, spec["factory"]),
        "n": spec["n"],
        **built,
        **searched,
    }


# ------------------------------------------------------------------------------------------ driver


def run_one(spec: dict) -> dict:
    """Run a worker in a fresh interpreter, so its peak RSS is its own."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker {spec['family']} n={spec['n']} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="FAISS/OpenMP threads (default: FAISS's default)")
    ap.add_argument("--families", nargs="+", default=["flat", "ivf", "hnsw"], choices=list(FAMILIES))
    ap.add_argument(
        "--train-size", type=int, default=0, help="train on this many held-out vectors (0: the stream's first)"
    )
    ap.add_argument("--paper-scale", action="store_true", help=f"--sizes {PAPER_SCALE} --families compressed")
    ap.add_argument("--json", action="store_true", help="also print every worker's result as one JSON line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.paper_scale:
        args.sizes, args.families = [PAPER_SCALE], ["compressed"]
        args.train_size = args.train_size or 131_072  # the template_index stage's default train_size

    families = ["flat"] + [f for f in args.families if f != "flat"]  # exact first: it makes the ground truth
    header = (
        f"{'N':>10} {'index':<12} {'factory':<36} {'search':<20} {'build s':>7} {'qps':>7} {'recall@10':>9} "
        f"{'build MB':>8} {'peak MB':>7} {'anon MB':>7} {'mapped MB':>9} {'file MB':>7} {'exact qps':>9} {'x exact':>7}"
    )
    summary, results = [], []
    with tempfile.TemporaryDirectory(prefix="index_scale_", dir=os.environ.get("INDEX_SCALE_DIR")) as tmp:
        for n in args.sizes:
            stream_exact = n * DIM * 4 > EXACT_IN_MEMORY_BYTES
            print(f"\nN={n:,} dim={DIM} queries={args.queries} k={K}", flush=True)
            print(header)
            print("-" * len(header), flush=True)
            exact_qps = None
            for family in families:
                factory, values = FAMILIES[family]
                spec = {
                    "family": family,
                    "factory": factory.replace("{nlist}", str(auto_nlist(n))).replace("{fs}", str(DIM // 4)),
                    "values": list(values),
                    "n": n,
                    "queries": args.queries,
                    "threads": args.threads,
                    "seed": args.seed,
                    "tmpdir": tmp,
                    "truth": str(Path(tmp) / f"truth_{n}.npy"),
                    "train_size": args.train_size,
                    "stream_exact": stream_exact,
                    "exact_qps": exact_qps if stream_exact else None,
                }
                r = build_and_search(spec)
                results.append(r)
                if family == "flat":
                    exact_qps = r["exact_qps"]
                for row in r["rows"]:
                    ratio = row["qps"] / r["exact_qps"]
                    print(
                        f"{n:>10,} {r['index']:<12} {r['factory']:<36} {row['param']:<20} {r['build_s']:>7.1f} "
                        f"{row['qps']:>7,.0f} {row['recall']:>9.3f} {r.get('build_peak_mb', 0):>8,.0f} "
                        f"{r['peak_mb']:>7,.0f} {r.get('search_anon_mb', 0):>7,.0f} "
                        f"{r.get('search_mapped_mb', 0):>9,.0f} "
                        f"{r['index_mb']:>7,.0f} {r['exact_qps']:>9,.1f} {ratio:>6.1f}x",
                        flush=True,
                    )
                    if family != "flat" and row["recall"] >= RECALL_TARGET:
                        summary.append((n, r["factory"], row["param"], row["recall"], ratio))
            print(
                f"(threads: {r['threads']}; build MB: the build process's RSS high-water mark; peak MB: the "
                "search process's, mapped index pages included; anon / mapped MB: the search process's "
                "private memory and its memory-mapped index pages after searching; mapped pages are page "
                "cache, shared and reclaimable)",
                flush=True,
            )

    if args.paper_scale:
        _paper_scale_verdict(results)
    else:
        _speedup_verdict(summary, max(args.sizes))
    if args.json:
        for r in results:
            print(json.dumps(r))


def _speedup_verdict(summary: list[tuple], largest: int) -> None:
    print(f"\napproximate qps / exact qps where recall@{K} >= {RECALL_TARGET}:")
    for n, factory, param, recall, ratio in summary:
        print(f"  N={n:>10,}  {factory:<36} {param:<20} recall@{K}={recall:.3f}  {ratio:6.1f}x")
    if not summary:
        print("  none")
    best = max((s[4] for s in summary if s[0] == largest), default=0.0)
    verdict = "met" if best >= SPEEDUP_TARGET else "NOT met"
    print(
        f"target at N={largest:,}: >= {SPEEDUP_TARGET:.0f}x exact qps at recall@{K} >= {RECALL_TARGET}: {verdict} "
        f"(best {best:.1f}x)"
    )


def _paper_scale_verdict(results: list[dict]) -> None:
    """The paper-scale targets: peak RSS under 8 GB, recall@10 >= 0.90 at >= 1,000 queries/s."""
    print(f"\npaper-scale targets: peak RSS < {PAPER_PEAK_MB:,} MB, recall@{K} >= {PAPER_RECALL}, qps >= {PAPER_QPS:,}")
    for r in results:
        if r["family"] == "flat":
            continue
        ok = [row for row in r["rows"] if row["recall"] >= PAPER_RECALL and row["qps"] >= PAPER_QPS]
        memory = max(r["build_peak_mb"], r["peak_mb"]) < PAPER_PEAK_MB
        verdict = "met" if ok and memory else "NOT met"
        best = max(ok, key=lambda row: row["qps"]) if ok else max(r["rows"], key=lambda row: row["recall"])
        print(
            f"  {r['factory']}: {verdict} (peak RSS: build {r['build_peak_mb']:,.0f} MB, search "
            f"{r['peak_mb']:,.0f} MB of which {r['search_mapped_mb']:,.0f} MB mapped index pages; "
            f"best {best['param']}: recall@{K} {best['recall']:.3f} at {best['qps']:,.0f} qps)"
        )


if __name__ == "__main__":
    main()
