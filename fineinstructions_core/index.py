"""Stage 3a, the template index: FAISS over L2-normalised description vectors (inner product = cosine).

Which index (`resolve_factory`): a bank under `exact_below` vectors gets an exact `IndexFlatIP`, since
brute force is fast there and gives perfect recall. Above it, `factory` picks an approximate index:

* unset, "auto" or "ivf": "IVF{nlist},Flat" with nlist ~ 4*sqrt(n) (a power of two), searched with `nprobe`;
* "hnsw": "HNSW32", searched with `ef_search` (no training; more memory, fast queries);
* "ivfpq": "IVF{nlist},PQ{dim/8}", ~25x smaller than Flat but lossy (recall@10 ~0.67 on the benchmark);
* "compressed" (what "auto" picks once Flat vectors would pass COMPRESS_ABOVE_BYTES, e.g. the released
  18M-template bank): "IVF{nlist}_HNSW32,PQ{dim/4}x4fs,Refine(SQ8)". A 4-bit fast-scan PQ over IVF lists
  (an HNSW graph finds the lists, so assigning millions of vectors stays cheap) proposes k*k_factor
  candidates, re-ranked on 8-bit scalar-quantized vectors. The re-ranking codes are streamed to disk
  while building (`write_index_from_batches`), so the build never holds them, and memory-mapped when
  searching, so the pages a search touches are page cache (shared by every process that searches the
  file, and reclaimed under memory pressure) rather than process memory;
* "flat"/"exact": always exact;
* anything else is a FAISS `index_factory` string, for example "IVF4096,Flat", "HNSW32" or
  "IVF{nlist},PQ48" ("{nlist}" is replaced by the automatic nlist).

Building (`build_index`, `build_index_from_batches`) trains on a sample, then adds vectors batch by batch,
so the embeddings need not be held twice. Loading (`load_index`) memory-maps the file by default, so
processes that search the same index share one copy in the page cache and start without reading it all.
Search-time parameters (`nprobe`, `ef_search`, `k_factor`) are set by `configure_search`, at build and at
load.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
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
# Re-ranked candidates per result for a Refine index. On benchmarks/index_scale.py the 4-bit PQ alone
# finds recall@10 0.43 at 1M vectors; re-ranking 20x gives 0.96 there, but at 18M (nprobe 32) 40x gives
# 0.906 and 80x 0.939 at 1,477 queries/s on 2 cores (README, "FAISS at scale").
DEFAULT_K_FACTOR = 80
# "auto" switches from IVF-Flat to the compressed index once Flat vectors alone would need this much
# memory (at 384-d: 2.8M vectors), so a bank of any size is indexed within a laptop's memory.
COMPRESS_ABOVE_BYTES = 4 * 2**30
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


def _fast_scan_subquantizers(dim: int) -> int:
    """4-bit fast-scan PQ sub-vector count: dim/4 rounded down to an even divisor of dim (96 for 384,
    48 bytes a vector); fast-scan packs codes in pairs, so the count must be even."""
    return max(m for m in range(2, max(2, dim // 4) + 1, 2) if dim % m == 0) if dim >= 2 else 1


def resolve_factory(n: int, dim: int, exact_below: int = DEFAULT_EXACT_BELOW, factory: str | None = None) -> str:
    """The FAISS factory string for a bank of n vectors of dimension dim (see the module docstring)."""
    if n < exact_below:
        return EXACT_FACTORY
    spec = (factory or "auto").strip()
    key = spec.lower()
    if key == "compressed" or (key == "auto" and n * dim * 4 > COMPRESS_ABOVE_BYTES):
        return f"IVF{auto_nlist(n)}_HNSW32,PQ{_fast_scan_subquantizers(dim)}x4fs,Refine(SQ8)"
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


def configure_search(index, nprobe: int | None = None, ef_search: int | None = None, k_factor: int | None = None):
    """Set search-time parameters where the index has them; returns the index.

    nprobe (IVF lists scanned per query) and efSearch (HNSW candidate list size) trade speed for recall.
    They are stored in the file, but the configured value should win over whatever was saved, so callers
    set them explicitly after loading. Parameters the index does not have are ignored (exact search has
    none); an HNSW coarse quantizer inside an IVF index also gets ef_search. k_factor (candidates
    re-ranked per result) applies to a Refine index.
    """
    import faiss

    for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("k_factor", k_factor)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if k_factor is not None:
        for layer in _layers(index):
            if isinstance(layer, faiss.IndexRefine):
                layer.k_factor = float(k_factor)
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
        if isinstance(layer, faiss.IndexRefine):
            info.update(k_factor=float(layer.k_factor), refine=type(faiss.downcast_index(layer.refine_index)).__name__)
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
    k_factor: int = DEFAULT_K_FACTOR,
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
    return configure_search(index, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)


def build_index_from_batches(
    batches: Iterable[np.ndarray],
    dim: int,
    n_total: int,
    exact_below: int = DEFAULT_EXACT_BELOW,
    factory: str | None = None,
    nprobe: int = DEFAULT_NPROBE,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
    k_factor: int = DEFAULT_K_FACTOR,
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
    A Refine index built here holds its re-ranking codes in memory; `write_index_from_batches` streams
    them to disk instead.

    The first rows are a fair training sample only when the stream order is unrelated to content; pass a
    random `train_sample` when it is sorted (e.g. by source).
    """
    index, _ = _build_from_batches(
        batches, dim, n_total, exact_below, factory, ef_construction, train_sample, train_size, spill=None
    )
    return configure_search(index, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)


def write_index_from_batches(
    batches: Iterable[np.ndarray],
    dim: int,
    n_total: int,
    path: Path,
    exact_below: int = DEFAULT_EXACT_BELOW,
    factory: str | None = None,
    nprobe: int = DEFAULT_NPROBE,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
    k_factor: int = DEFAULT_K_FACTOR,
    ef_construction: int | None = None,
    train_sample: np.ndarray | None = None,
    train_size: int | None = None,
):
    """Build as `build_index_from_batches` does, save to `path` atomically, and return the saved index
    loaded memory-mapped (as the matching stage will load it).

    A Refine index whose re-ranking storage is flat codes (the "compressed" choice: SQ8) never holds
    those codes in memory: each batch is encoded and appended to a temporary file beside `path`, and
    the saved file is assembled from the index and that file. At 18M 384-d vectors that keeps 6.9 GB of
    codes out of memory during the build, and memory-mapping keeps them out while searching.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, codes = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".codes")
    try:
        with os.fdopen(fd, "wb") as sink:
            index, spilled = _build_from_batches(
                batches, dim, n_total, exact_below, factory, ef_construction, train_sample, train_size, spill=sink
            )
        configure_search(index, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
        if spilled:
            _save_refine_with_codes(index, Path(codes), path)
        else:
            save_index(index, path)
        del index
    finally:
        Path(codes).unlink(missing_ok=True)
    return load_index(path, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)


def _spillable_refine(index):
    """(base, refine) when index is a Refine index whose re-ranking storage is flat codes, else None."""
    import faiss

    if not isinstance(index, faiss.IndexRefine):
        return None
    refine = faiss.downcast_index(index.refine_index)
    if not isinstance(refine, faiss.IndexFlatCodes):
        return None
    return faiss.downcast_index(index.base_index), refine


def _build_from_batches(
    batches: Iterable[np.ndarray],
    dim: int,
    n_total: int,
    exact_below: int,
    factory: str | None,
    ef_construction: int | None,
    train_sample: np.ndarray | None,
    train_size: int | None,
    spill: Any,
) -> tuple[Any, bool]:
    """The shared build loop: (index, whether its re-ranking codes went to `spill` instead of into it)."""
    spec = resolve_factory(n_total, dim, exact_below, factory)
    index = _new_index(dim, spec, ef_construction)
    parts = _spillable_refine(index) if spill is not None else None
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
    if parts is None:
        _reserve(index, n_total)
    added = 0
    for batch in _chain(pending, stream):
        batch = _as_batch(batch, dim)
        if parts is None:
            index.add(batch)
        else:
            base, refine = parts
            base.add(batch)
            spill.write(refine.sa_encode(batch).tobytes())
        added += len(batch)
    pending.clear()
    if parts is not None:
        index.ntotal = added
    if added != n_total:
        log.warning("template index: expected %d vectors, got %d (index chosen for %d)", n_total, added, n_total)
    log.info("template index: %s over %d vectors (%s)", spec, added, type(index).__name__)
    return index, parts is not None


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
    _write_atomically(path, lambda tmp: faiss.write_index(index, tmp))
    return path


def _write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path`; on any failure
    the temporary file is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        honour_umask(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_refine_with_codes(index, codes: Path, path: Path) -> None:
    """Write a Refine index whose re-ranking codes are in the file `codes` (its refine storage is empty).

    FAISS writes a Refine index as header, base index, refine index, k_factor, and a flat-codes index
    ends with its code count and then the codes. So the file is FAISS's own for the empty-refine index,
    with the refine part's row count and code size patched and the codes appended before k_factor;
    `faiss.read_index` reads it like any other. The layout is checked, never assumed.
    """
    import faiss

    refine = faiss.downcast_index(index.refine_index)
    n = int(index.ntotal)
    tail = faiss.serialize_index(refine).tobytes()
    k_bytes = np.float32(index.k_factor).tobytes()
    if refine.ntotal != 0 or tail[-8:] != bytes(8) or tail[8:16] != bytes(8):
        raise RuntimeError(f"cannot append re-ranking codes to a {type(refine).__name__} of this layout")
    expected = n * refine.code_size
    if codes.stat().st_size != expected:
        raise RuntimeError(f"re-ranking codes {codes}: {codes.stat().st_size} bytes, expected {expected}")

    def write(tmp: str) -> None:
        faiss.write_index(index, tmp)
        cut = os.path.getsize(tmp) - len(tail) - len(k_bytes)
        with open(tmp, "r+b") as f:
            f.seek(cut)
            if f.read() != tail + k_bytes:
                raise RuntimeError("unexpected FAISS Refine index layout: cannot append the re-ranking codes")
            f.seek(cut)
            f.truncate()
            header = bytearray(tail)
            header[8:16] = np.int64(n).tobytes()
            header[-8:] = np.uint64(expected).tobytes()
            f.write(header)
            with open(codes, "rb") as src:
                shutil.copyfileobj(src, f, 16 * 2**20)
            f.write(k_bytes)

    _write_atomically(path, write)


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


def _file_mappings(path: Path) -> list[tuple[int, int, str, int]]:
    """This process's mappings of `path`: (start, end, permissions, resident KiB), from /proc/self/smaps
    (Linux; empty elsewhere)."""
    target, found = str(Path(path).resolve()), []
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    current: list | None = None
    for line in lines:
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
            current = None
            if len(head) == 6 and head[5] == target:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = [start, end, head[1], 0]
                found.append(current)
        elif current is not None and line.startswith("Rss:"):
            current[3] = int(line.split()[1])
    return [tuple(m) for m in found]


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux; 0 elsewhere)."""
    return sum(rss for _, _, _, rss in _file_mappings(path))


def _unmap_read_pages(path: Path) -> None:
    """Drop the pages FAISS touched while reading a memory-mapped index from this process's page tables.

    Why: FAISS copies the parts it cannot map in place (the IVF fast-scan lists) out of the mapping, so
    those pages would count twice in the process's memory for as long as it lives, once mapped, once
    copied: about 1 GB at 18M templates. The data stays in the page cache, so what search reads later
    (the re-ranking codes) is mapped again on first touch. Other live indexes of the same file in this
    process lose their resident pages too, which costs them only those re-faults. Linux only."""
    import ctypes

    mappings = [(start, end) for start, end, perms, _ in _file_mappings(path) if "w" not in perms]
    if not mappings:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    madv_dontneed = 4
    for start, end in mappings:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), madv_dontneed) != 0:
            log.debug("template index %s: madvise failed (errno %d)", path, ctypes.get_errno())


def load_index(
    path: Path,
    mmap: bool = True,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    k_factor: int | None = None,
):
    """Read an index saved by `save_index`, memory-mapped and read-only by default.

    With mmap, pages are read on demand and shared by every process searching the same file (one copy
    in the page cache instead of one per worker). Index types FAISS cannot map are read into memory
    instead. A memory-mapped index cannot be modified (add/train/reset raise). nprobe / ef_search /
    k_factor, when given, override the values saved in the file.
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
            _unmap_read_pages(path)
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
    return configure_search(index, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (similarities, row ids) per query; k is clamped to the index size. Approximate indexes may
    return fewer than k hits for a query, padded with id -1."""
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
