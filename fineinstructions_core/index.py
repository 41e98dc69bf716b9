"""Stage 3a, the template index: FAISS over L2-normalised description vectors (inner product = cosine).

Small banks get an exact flat index; above `exact_below` vectors the configured factory string (for
example "IVF4096,Flat" or "HNSW32") builds an approximate one, trained on a sample.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def build_index(vectors: np.ndarray, exact_below: int = 100_000, factory: str | None = None, nprobe: int = 32):
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n < exact_below or not factory:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            sample = vectors[rng.choice(n, size=min(n, 256 * 1024), replace=False)]
            index.train(sample)
        if hasattr(index, "nprobe"):
            index.nprobe = nprobe
    index.add(vectors)
    return index


def save_index(index, path: Path) -> Path:
    import faiss

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    faiss.write_index(index, tmp)
    os.replace(tmp, path)
    return path


def load_index(path: Path):
    import faiss

    if not path.exists():
        raise FileNotFoundError(f"template index {path} is missing: materialize template_index first")
    return faiss.read_index(str(path))


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
