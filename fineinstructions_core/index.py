"""Stage 3a, the template index: FAISS over L2-normalised description vectors (inner product = cosine).

Which index (`resolve_factory`): a bank under `exact_below` vectors gets an exact `IndexFlatIP`, since
brute force is fast there and gives perfect recall. Above it, `factory` picks an approximate index:

* unset, "auto" or "ivf": "IVF{nlist},Flat" with nlist ~ 4*sqrt(n) (a power of two), searched with `nprobe`;
* "hnsw": "HNSW32", searched with `ef_search` (no training; more memory, fast queries);
* "ivfpq": "IVF{nlist},PQ{dim/8}", ~25x smaller than Flat but lossy (recall@10 ~0.67 on the benchmark);
* "flat"/"exact": always exact;
* anything else is a FAISS `index_factory` string, for example "IVF4096,Flat", "HNSW32" or
  "IVF{nlist},PQ48" ("{nlist}" is replaced by the automatic nlist).

Building (`build_index`, `build_index_from_batches`) trains on a sample, then adds vectors batch by batch,
so the embeddings need not be held twice. Loading (`load_index`) memory-maps the file by default, so
processes that search the same index share one copy in the page cache and start without reading it all.
Search-time parameters (`nprobe`, `ef_search`) are set by `configure_search`, at build and at load.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .io.files import honour_umask

log = logging.getLogger(__name__)

EXACT_FACTORY = "Flat"
DEFAULT_EXACT_BELOW = 100_000
DEFAULT_NPROBE = 32
# HNSW's own default (16) loses much recall on 384-d embeddings. On benchmarks/index_scale.py, HNSW32 at
# efSearch 128 reaches recall@10 0.99 at 100K vectors but only ~0.88 at 1M, where IVF ("auto") does better.
DEFAULT_EF_SEARCH = 128
# Rows per `add` call when the caller hands over one array: bounds FAISS's temporary buffers.
ADD_BATCH = 65_536
# k-means gains little past ~64 points per centroid, and FAISS subsamples above 256 anyway.
TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_SIZE = 65_536
MAX_TRAIN_SIZE = 262_144

_ALIASES = {"exact": EXACT_FACTORY, "flat": EXACT_FACTORY, "hnsw": "HNSW32"}
_MISSING = "template index {path} is missing: materialize template_index first"
# Methods that would write into a memory-mapped (read-only) index; FAISS aborts the process on them.
_MUTATORS = ("add", "add_with_ids", "train", "reset", "remove_ids", "merge_from")


# ------------------------------------------------------------------------------------------ choice


def auto_nlist(n: int) -> int:
    """IVF list count for n vectors: the power of two nearest 4*sqrt(n), with >= 39 vectors per list.

    4*sqrt(n) balances the cost of scanning the centroids against scanning the lists; the floor of 39
    training points per centroid is where FAISS's k-means stops warning about too few points.
    """
    if n < 39:
        return 1
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and 39 * nlist > n:
        nlist //= 2
    return nlist


def _pq_subquantizers(dim: int) -> int:
    """PQ sub-vector count: the largest divisor of dim not above dim/8 (48 for 384: 48 bytes a vector)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def resolve_factory(n: int, dim: int, exact_below: int = DEFAULT_EXACT_BELOW, factory: str | None = None) -> str:
    """The FAISS factory string for a bank of n vectors of dimension dim (see the module docstring)."""
    if n < exact_below:
        return EXACT_FACTORY
    spec = (factory or "auto").strip()
    key = spec.lower()
    if key in ("auto", "ivf"):
        return f"IVF{auto_nlist(n)},Flat"
    if key == "ivfpq":
        return f"IVF{auto_nlist(n)},PQ{_pq_subquantizers(dim)}"
    if key in _ALIASES:
        return _ALIASES[key]
    return spec.replace("{nlist}", str(auto_nlist(n)))


def _new_index(dim: int, factory: str, ef_construction: int | None):
    import faiss

    if factory == EXACT_FACTORY:
        return faiss.IndexFlatIP(dim)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS index factory {factory!r}: {str(e).strip().splitlines()[-1]}") from e
    if ef_construction is not None:
        for layer in _layers(index):
            if isinstance(layer, faiss.IndexHNSW):
                layer.hnsw.efConstruction = int(ef_construction)
    return index


def _default_train_size(index, n_total: int) -> int:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    want = TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else MIN_TRAIN_SIZE
    return int(min(n_total, max(MIN_TRAIN_SIZE, min(want, MAX_TRAIN_SIZE))))


# -------------------------------------------------------------------------------------- parameters


def _layers(index) -> Iterator[Any]:
    """The index and the indexes it wraps (pre-transform, refine, id map), each downcast to its class."""
    import faiss

    while index is not None:
        index = faiss.downcast_index(index)
        yield index
        if isinstance(index, faiss.IndexRefine):
            index = index.base_index
        elif isinstance(index, faiss.IndexPreTransform | faiss.IndexIDMap | faiss.IndexIDMap2):
            index = index.index
        else:
            index = None


def configure_search(index, nprobe: int | None = None, ef_search: int | None = None):
    """Set search-time parameters where the index has them; returns the index.

    nprobe (IVF lists scanned per query) and efSearch (HNSW candidate list size) trade speed for recall.
    They are stored in the file, but the configured value should win over whatever was saved, so callers
    set them explicitly after loading. Parameters the index does not have are ignored (exact search has
    none); an HNSW coarse quantizer inside an IVF index also gets ef_search.
    """
    import faiss

    if nprobe is not None and nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    if ef_search is not None and ef_search < 1:
        raise ValueError(f"ef_search must be >= 1, got {ef_search}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if nprobe is not None:
            ivf.nprobe = int(min(nprobe, ivf.nlist))
        if ef_search is not None:
            for layer in _layers(ivf.quantizer):
                if isinstance(layer, faiss.IndexHNSW):
                    layer.hnsw.efSearch = int(ef_search)
    if ef_search is not None:
        for layer in _layers(index):
            if isinstance(layer, faiss.IndexHNSW):
                layer.hnsw.efSearch = int(ef_search)
    return index


def describe_index(index) -> dict[str, Any]:
    """Type, size and search parameters of an index, for logs and stage metadata."""
    import faiss

    info: dict[str, Any] = {"type": type(index).__name__, "ntotal": int(index.ntotal), "dim": int(index.d)}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexHNSW):
            info.update(hnsw_m=int(layer.hnsw.nb_neighbors(1)), ef_search=int(layer.hnsw.efSearch))
    return info


# ---------------------------------------------------------------------------------------- building


def _as_batch(batch: np.ndarray, dim: int) -> np.ndarray:
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 2 or batch.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {batch.shape}")
    return batch


def _reserve(index, n_total: int) -> None:
    """Pre-size flat code storage (exact index, HNSW's vectors) so that growing it never copies it.

    FAISS stores these codes in one growing vector: without this, the reallocation while adding briefly
    holds the old and the new buffer (measured: 2.6 GB peak for a 1.5 GB exact index). Resizing up then
    down keeps the capacity. Best effort: skipped where the storage does not expose its codes.
    """
    import faiss

    for layer in _layers(index):
        storage = faiss.downcast_index(layer.storage) if isinstance(layer, faiss.IndexHNSW) else layer
        if isinstance(storage, faiss.IndexFlatCodes) and storage.ntotal == 0:
            try:
                storage.codes.resize(n_total * storage.code_size)
                storage.codes.resize(0)
            except (AttributeError, RuntimeError):  # older FAISS without a resizable codes vector
                return
            return


def build_index(
    vectors: np.ndarray,
    exact_below: int = DEFAULT_EXACT_BELOW,
    factory: str | None = None,
    nprobe: int = DEFAULT_NPROBE,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
    ef_construction: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
):
    """Index an in-memory (n, dim) array of L2-normalised vectors (see the module docstring for the choice).

    Trains on a uniform random sample of the rows (the only extra copy), then adds the rows in slices of
    ADD_BATCH, so peak memory is about the index plus the array plus the sample.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    n, dim = vectors.shape
    spec = resolve_factory(n, dim, exact_below, factory)
    index = _new_index(dim, spec, ef_construction)
    if not index.is_trained:
        size = train_size or _default_train_size(index, n)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))
        index.train(np.ascontiguousarray(vectors[rows]))
    _reserve(index, n)
    for start in range(0, n, ADD_BATCH):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_BATCH]))
    log.info("template index: %s over %d vectors (%s)", spec, n, type(index).__name__)
    return configure_search(index, nprobe=nprobe, ef_search=ef_search)


def build_index_from_batches(
    batches: Iterable[np.ndarray],
    dim: int,
    n_total: int,
    exact_below: int = DEFAULT_EXACT_BELOW,
    factory: str | None = None,
    nprobe: int = DEFAULT_NPROBE,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
    ef_construction: int | None = None,
    train_sample: np.ndarray | None = None,
    train_size: int | None = None,
):
    """Index vectors that arrive in (b, dim) batches, e.g. straight from the embedder, one pass over them.

    n_total (the expected row count) picks the index and pre-sizes its storage. An index that needs
    training is trained on `train_sample` when given, else on the first `train_size` rows of the stream
    (default: 64 per IVF list, 65,536 to 262,144 rows): these rows are buffered, used to train, then added.

    Memory: the index itself (dim*4 bytes a vector for Flat, plus 8 for the id in IVF-Flat, plus ~M*8
    of graph in HNSW; dim/8 + 8 for IVF-PQ), plus the training buffer (train_size*dim*4 bytes, released
    once its rows are added), plus the batch in hand. The stream is never materialised, so generate the
    batches lazily. Flat storage is pre-sized (no copy on growth); IVF lists grow one by one, which left
    the 1M-vector benchmark build at ~1.5x the IVF-Flat file size. The saved file has no such slack.

    The first rows are a fair training sample only when the stream order is unrelated to content; pass a
    random `train_sample` when it is sorted (e.g. by source).
    """
    spec = resolve_factory(n_total, dim, exact_below, factory)
    index = _new_index(dim, spec, ef_construction)
    stream = iter(batches)
    pending: list[np.ndarray] = []
    if not index.is_trained:
        if train_sample is not None:
            index.train(_as_batch(train_sample, dim))
        else:
            size = max(1, train_size or _default_train_size(index, n_total))
            buffer = np.empty((size, dim), dtype=np.float32)
            filled = 0
            for batch in stream:
                batch = _as_batch(batch, dim)
                take = min(size - filled, len(batch))
                buffer[filled : filled + take] = batch[:take]
                filled += take
                if take < len(batch):
                    pending.append(batch[take:])
                if filled == size:
                    break
            if filled == 0:
                raise ValueError("no vectors to index: the batch stream is empty")
            index.train(buffer[:filled])
            pending.insert(0, buffer[:filled])
            del buffer
    _reserve(index, n_total)
    added = 0
    for batch in _chain(pending, stream):
        batch = _as_batch(batch, dim)
        index.add(batch)
        added += len(batch)
    pending.clear()
    if added != n_total:
        log.warning("template index: expected %d vectors, got %d (index chosen for %d)", n_total, added, n_total)
    log.info("template index: %s over %d vectors (%s)", spec, added, type(index).__name__)
    return configure_search(index, nprobe=nprobe, ef_search=ef_search)


def _chain(first: list[np.ndarray], rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Yield the buffered batches (dropping each reference once added), then the rest of the stream."""
    while first:
        yield first.pop(0)
    yield from rest


# ------------------------------------------------------------------------------------- save / load


def save_index(index, path: Path) -> Path:
    """Write atomically (temp file + rename): readers never see a partial file, and a process that has
    the old file memory-mapped keeps reading the old inode safely."""
    import faiss

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        honour_umask(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _mmap_flag_sets() -> list[tuple[str, int]]:
    """Read flags to try, best first. In FAISS 1.15, MMAP_IFC maps Flat, HNSW storage and IVF lists in
    place; the older MMAP flag maps only IVF lists (as on-disk lists) and cannot be combined with it."""
    import faiss

    flags = []
    if hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        flags.append(("mmap_ifc", faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY))
    flags.append(("mmap_ivf", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY))
    return flags


def _read_only(index, path: Path) -> None:
    """Make writes to a memory-mapped index raise instead of aborting the process inside FAISS."""

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError(f"template index {path} was loaded memory-mapped (read-only); load it with mmap=False")

    for name in _MUTATORS:
        if hasattr(index, name):
            setattr(index, name, refuse)


def load_index(path: Path, mmap: bool = True, *, nprobe: int | None = None, ef_search: int | None = None):
    """Read an index saved by `save_index`, memory-mapped and read-only by default.

    With mmap, pages are read on demand and shared by every process searching the same file (one copy
    in the page cache instead of one per worker). Index types FAISS cannot map are read into memory
    instead. A memory-mapped index cannot be modified (add/train/reset raise). nprobe / ef_search, when
    given, override the values saved in the file.
    """
    import faiss

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(_MISSING.format(path=path))
    index = None
    if mmap:
        for name, flags in _mmap_flag_sets():
            try:
                index = faiss.read_index(str(path), flags)
            except RuntimeError as e:
                log.debug("template index %s: %s read failed: %s", path, name, str(e).strip().splitlines()[-1])
                continue
            _read_only(index, path)
            break
        else:
            log.info("template index %s: this index type cannot be memory-mapped, reading it into memory", path)
    if index is None:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1]
            raise ValueError(
                f"template index {path} is not a readable FAISS index ({detail}): materialize template_index again"
            ) from e
    return configure_search(index, nprobe=nprobe, ef_search=ef_search)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (similarities, row ids) per query; k is clamped to the index size. Approximate indexes may
    return fewer than k hits for a query, padded with id -1."""
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
