"""Reading corpora at scale: documents/s and peak memory, Parquet and zstd JSONL, at two or more sizes.

For each size it writes a synthetic FineWeb-like corpus (text, id, url, language, score columns; ~1 KB of
text per document) as Parquet (row groups of 10,000 rows) and, if asked, as `.jsonl.zst`, streamed so the
generator never holds the corpus either. Then, each in its own subprocess so each peak RSS is measured
alone, it cuts the file into shards (`plan_shards`, the manifest's path) and reads every shard through
the corpus reader with the metadata columns carried, as the `documents` stage does, and reports shards
and documents per second, peak RSS (VmHWM) and the RSS before reading (the imports). Peak memory that
stays flat while the file grows is the point: the readers stream by row group, batch and chunk.

    python benchmarks/read_scale.py                          # 100k and 400k docs of Parquet, 100k of zst
    python benchmarks/read_scale.py --sizes 500000 2000000 --formats parquet jsonl.zst   # ~2 GB of text
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have not but "
    "their more can has its also been other one were all they when used may some there such into these "
    "time between most only over new first each about after many like system data water energy process "
    "model people health history research design language public school market power science city"
).split()
ROW_GROUP = 10_000


def _paragraphs(n: int = 2048, words: int = 170, seed: int = 0) -> list[str]:
    import random

    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def generate(folder: Path, docs: int, fmt: str) -> Path:
    """A corpus of `docs` documents written batch by batch (each text unique: a numbered paragraph)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = _paragraphs()
    path = folder / f"corpus-{docs}.{'parquet' if fmt == 'parquet' else 'jsonl.zst'}"
    if path.exists():
        return path

    def batch(start: int, stop: int) -> dict[str, list]:
        ids = range(start, stop)
        return {
            "id": [f"<urn:uuid:{i:012d}>" for i in ids],
            "text": [f"Document {i}. {paras[i % len(paras)]} {paras[(i * 7 + 3) % len(paras)]}" for i in ids],
            "url": [f"https://example.org/page/{i}" for i in ids],
            "language": ["en"] * (stop - start),
            "score": [2.5 + (i % 100) / 100 for i in ids],
        }

    if fmt == "parquet":
        writer = None
        for start in range(0, docs, ROW_GROUP):
            table = pa.table(batch(start, min(start + ROW_GROUP, docs)))
            writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP)
        assert writer is not None
        writer.close()
        return path
    import zstandard

    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        for start in range(0, docs, ROW_GROUP):
            cols = batch(start, min(start + ROW_GROUP, docs))
            rows = (dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True))
            out.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(path: Path, fmt: str, shard_size: int) -> dict:
    """Shard one file and read every shard, as the `documents` stage does; in its own process."""
    from fineinstructions_core.config import parse_config
    from fineinstructions_core.io.readers import Record, read_corpus_records
    from fineinstructions_core.shards import plan_shards

    base_rss = _rss_kb("VmRSS")
    work = Path(tempfile.mkdtemp(prefix="read_scale_"))
    model = {"model": "unused"}
    cfg = parse_config(
        {
            "data_dir": str(work),
            "scale": "full",
            "model_profiles": {"embedded": {"genericize": model, "instantiate": model, "judge": model}},
            "corpora": [
                {
                    "name": "bench",
                    "path": str(path),
                    "format": "jsonl" if fmt == "jsonl.zst" else "parquet",
                    "id_field": "id",
                    "metadata": ["url", "language", "score"],
                    "shard_size": shard_size,
                }
            ],
        },
        root=path.parent,
    )
    corpus = cfg.corpus("bench")
    t0 = time.perf_counter()
    shards = plan_shards(cfg, corpus)
    t_shard = time.perf_counter() - t0
    docs = rejected = chars = 0
    t0 = time.perf_counter()
    for shard in shards:
        for seg in shard.segments:
            for item in read_corpus_records(corpus, cfg.root / seg.file, cfg.root, seg.start, seg.stop, 5_000_000):
                if isinstance(item, Record):
                    docs += 1
                    chars += len(item.text)
                else:
                    rejected += 1
    t_read = time.perf_counter() - t0
    return {
        "format": fmt,
        "docs": docs,
        "rejected": rejected,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "text_mb": round(chars / 1e6, 1),
        "shards": len(shards),
        "shard_s": round(t_shard, 2),
        "read_s": round(t_read, 2),
        "docs_per_s": round(docs / t_read) if t_read else 0,
        "rss_before_mb": round(base_rss / 1024),
        "peak_rss_mb": round(_rss_kb("VmHWM") / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000], help="documents per corpus")
    ap.add_argument("--formats", nargs="+", default=["parquet", "jsonl.zst"], choices=["parquet", "jsonl.zst"])
    ap.add_argument("--zst-sizes", type=int, nargs="*", default=None, help="sizes for jsonl.zst (default: the first)")
    ap.add_argument("--shard-size", type=int, default=50_000, help="documents per shard")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the corpora (default: a temp folder)")
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "FORMAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1], args.shard_size)))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="read_scale_data_"))
    folder.mkdir(parents=True, exist_ok=True)
    plan = [("parquet", n) for n in args.sizes] if "parquet" in args.formats else []
    if "jsonl.zst" in args.formats:
        plan += [("jsonl.zst", n) for n in (args.zst_sizes if args.zst_sizes is not None else args.sizes[:1])]
    header = f"{'format':<10}{'docs':>10}{'file MB':>9}{'text MB':>9}{'shards':>7}{'shard s':>8}{'read s':>8}"
    header += f"{'docs/s':>9}{'RSS before':>11}{'peak RSS':>9}"
    print(header)
    for fmt, n in plan:
        t0 = time.perf_counter()
        path = generate(folder, n, fmt)
        gen_s = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--worker", str(path), fmt, "--shard-size", str(args.shard_size)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(
            f"{r['format']:<10}{r['docs']:>10}{r['file_mb']:>9}{r['text_mb']:>9}{r['shards']:>7}{r['shard_s']:>8}"
            f"{r['read_s']:>8}{r['docs_per_s']:>9}{r['rss_before_mb']:>9}MB{r['peak_rss_mb']:>7}MB"
            f"   (generated in {gen_s:.1f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
