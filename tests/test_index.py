"""The template index: index choice, batched building, search parameters, save / memory-mapped load."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

from fineinstructions_core.index import (
    EXACT_FACTORY,
    auto_nlist,
    build_index,
    build_index_from_batches,
    configure_search,
    describe_index,
    load_index,
    mapped_kib,
    resolve_factory,
    save_index,
    search,
    write_index_from_batches,
)

faiss = pytest.importorskip("faiss")

DIM = 32


def _vectors(n: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """Clustered, L2-normalised vectors (like sentence embeddings, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, DIM)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _batches(x: np.ndarray, size: int):
    for start in range(0, len(x), size):
        yield x[start : start + size]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return _vectors(4000), _vectors(50, seed=1)


def test_auto_picks_exact_below_threshold_and_ivf_above():
    assert resolve_factory(999, DIM, exact_below=1000) == EXACT_FACTORY
    assert resolve_factory(999, DIM, exact_below=1000, factory="HNSW32") == EXACT_FACTORY
    assert resolve_factory(1000, DIM, exact_below=1000) == f"IVF{auto_nlist(1000)},Flat"
    assert resolve_factory(1_000_000, 384, factory="auto") == "IVF4096,Flat"
    assert resolve_factory(1_000_000, 384, factory="ivfpq") == "IVF4096,PQ48"
    assert resolve_factory(1_000_000, 384, factory="hnsw") == "HNSW32"
    assert resolve_factory(1_000_000, 384, factory="exact") == EXACT_FACTORY
    assert resolve_factory(1_000_000, 384, factory="IVF{nlist},SQ8") == "IVF4096,SQ8"
    assert resolve_factory(1_000_000, 384, factory="IVF1024,Flat") == "IVF1024,Flat"
    # A bank whose Flat vectors would pass 4 GiB (the released 18M-template bank) gets the compressed index.
    assert resolve_factory(2_000_000, 384) == f"IVF{auto_nlist(2_000_000)},Flat"
    assert resolve_factory(18_000_000, 384) == "IVF16384_HNSW32,PQ96x4fs,Refine(SQ8)"
    assert resolve_factory(5000, DIM, exact_below=1000, factory="compressed") == "IVF128_HNSW32,PQ8x4fs,Refine(SQ8)"
    # Enough training points per list, even for small banks.
    assert all(39 * auto_nlist(n) <= n for n in (39, 100, 5_000, 100_000))


def test_build_index_choice(data):
    x, _ = data
    assert isinstance(build_index(x, exact_below=len(x) + 1, factory="auto"), faiss.IndexFlatIP)
    ivf = build_index(x, exact_below=1000, factory="auto", nprobe=4)
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.nlist == auto_nlist(len(x)) and ivf.ntotal == len(x)
    assert isinstance(build_index(x, exact_below=1000), faiss.IndexIVFFlat)  # unset factory above: auto
    with pytest.raises(ValueError, match="invalid FAISS index factory"):
        build_index(x, exact_below=1000, factory="NoSuchIndex")


def test_search_params_applied(data):
    x, _ = data
    ivf = build_index(x, exact_below=1000, factory="IVF16,Flat", nprobe=5)
    assert describe_index(ivf)["nprobe"] == 5
    configure_search(ivf, nprobe=9)
    assert faiss.extract_index_ivf(ivf).nprobe == 9
    configure_search(ivf, nprobe=1000)  # clamped to nlist
    assert faiss.extract_index_ivf(ivf).nprobe == 16
    hnsw = build_index(x, exact_below=1000, factory="HNSW16", ef_search=77, ef_construction=60)
    assert hnsw.hnsw.efSearch == 77 and hnsw.hnsw.efConstruction == 60
    configure_search(hnsw, ef_search=33)
    assert describe_index(hnsw)["ef_search"] == 33
    wrapped = build_index(x, exact_below=1000, factory="PCA16,IVF8,Flat", nprobe=3)
    assert faiss.extract_index_ivf(wrapped).nprobe == 3
    flat = build_index(x, exact_below=len(x) + 1)
    assert configure_search(flat, nprobe=4, ef_search=8) is flat  # no such parameters: ignored
    with pytest.raises(ValueError):
        configure_search(ivf, nprobe=0)


def test_batched_build_equals_one_shot_exact(data):
    x, q = data
    one = build_index(x, exact_below=len(x) + 1)
    batched = build_index_from_batches(_batches(x, 333), DIM, len(x), exact_below=len(x) + 1)
    assert batched.ntotal == one.ntotal == len(x)
    np.testing.assert_array_equal(faiss.rev_swig_ptr(batched.get_xb(), x.size), x.ravel())
    d1, i1 = search(one, q, 10)
    d2, i2 = search(batched, q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_batched_build_trains_on_first_rows_or_given_sample(data):
    x, q = data
    from_stream = build_index_from_batches(_batches(x, 700), DIM, len(x), 1000, "IVF16,Flat", 16, train_size=1500)
    sample = build_index_from_batches(_batches(x, 700), DIM, len(x), 1000, "IVF16,Flat", 16, train_sample=x[::2])
    exact = build_index(x, exact_below=len(x) + 1)
    _, truth = search(exact, q, 10)
    for index in (from_stream, sample):
        assert index.ntotal == len(x) and index.is_trained
        _, ids = search(index, q, 10)  # nprobe == nlist: an exhaustive scan
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(truth, axis=1))
    with pytest.raises(ValueError, match="shape"):
        build_index_from_batches([x[:, :8]], DIM, len(x), exact_below=len(x) + 1)
    with pytest.raises(ValueError, match="empty"):
        build_index_from_batches([], DIM, 10_000, exact_below=1000, factory="IVF16,Flat")


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat", "HNSW16", "IVF16,PQ8x4"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path: Path, data, factory: str, mmap: bool):
    x, q = data
    index = build_index(x, exact_below=1000, factory=factory, nprobe=8, ef_search=40)
    path = save_index(index, tmp_path / "sub" / "index.faiss")
    assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]  # no temp file left behind
    loaded = load_index(path, mmap=mmap)
    assert type(loaded) is type(index) and loaded.ntotal == index.ntotal
    assert describe_index(loaded) == describe_index(index)
    d0, i0 = search(index, q, 10)
    d1, i1 = search(loaded, q, 10)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(d0, d1)


def test_load_overrides_search_params_and_mmap_is_read_only(tmp_path: Path, data):
    x, _ = data
    path = save_index(build_index(x, exact_below=1000, factory="IVF32,Flat", nprobe=8), tmp_path / "i.faiss")
    assert describe_index(load_index(path))["nprobe"] == 8  # persisted
    assert describe_index(load_index(path, nprobe=3))["nprobe"] == 3
    hnsw = save_index(build_index(x, exact_below=1000, factory="HNSW16", ef_search=40), tmp_path / "h.faiss")
    assert load_index(hnsw, ef_search=90).hnsw.efSearch == 90
    mapped = load_index(path, mmap=True)
    with pytest.raises(RuntimeError, match="read-only"):
        mapped.add(x[:2])  # FAISS itself would abort the process here
    writable = load_index(path, mmap=False)
    writable.add(x[:2])
    assert writable.ntotal == len(x) + 2


def test_missing_and_corrupt_index(tmp_path: Path):
    missing = tmp_path / "nope.faiss"
    with pytest.raises(FileNotFoundError, match="is missing: materialize template_index first"):
        load_index(missing)
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not a faiss index at all")
    for mmap in (True, False):
        with pytest.raises(ValueError, match="not a readable FAISS index"):
            load_index(bad, mmap=mmap)


def test_search_clamps_k(data):
    x, q = data
    index = build_index(x[:5], exact_below=1000)
    sims, ids = search(index, q[:3], 10)
    assert sims.shape == ids.shape == (3, 5)


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth, strict=True)]))


def test_compressed_index_streams_its_reranking_codes_to_disk(tmp_path, data):
    """The compressed index's 8-bit re-ranking codes go to disk batch by batch; the file is FAISS's own
    (plain read_index reads it), memory-mapped on load, and searches exactly as the in-memory build."""
    x, q = _vectors(6000), _vectors(50, seed=1)
    args = (DIM, len(x), 1000, "compressed", 8)
    in_memory = build_index_from_batches(_batches(x, 700), *args, k_factor=40, train_sample=x[::3])
    path = tmp_path / "lake" / "index.faiss"
    on_disk = write_index_from_batches(_batches(x, 700), *args[:2], path, *args[2:], k_factor=40, train_sample=x[::3])
    assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]  # no temporary file left behind
    info = describe_index(on_disk)
    assert (info["type"], info["ntotal"], info["k_factor"], info["refine"]) == (
        "IndexRefine",
        len(x),
        40.0,
        "IndexScalarQuantizer",
    )
    # The in-memory build keeps its codes; the streamed one kept none in memory while building.
    assert faiss.downcast_index(in_memory.refine_index).ntotal == len(x)
    with pytest.raises(RuntimeError, match="read-only"):
        on_disk.add(x[:1])  # memory-mapped
    plain = faiss.read_index(str(path))
    refine = faiss.downcast_index(plain.refine_index)
    assert plain.ntotal == refine.ntotal == len(x)
    assert np.array_equal(faiss.vector_to_array(refine.codes).reshape(len(x), -1), refine.sa_encode(x))
    assert np.array_equal(search(on_disk, q, 10)[1], in_memory.search(q, 10)[1])
    truth = build_index(x, exact_below=len(x) + 1).search(q, 10)[1]
    # On these noisy 32-d vectors 4-bit PQ alone finds few true neighbours; re-ranking 40x recovers most.
    reranked = _recall(search(on_disk, q, 10)[1], truth)
    assert reranked >= 0.8
    assert describe_index(load_index(path, k_factor=3))["k_factor"] == 3.0
    assert _recall(search(load_index(path, k_factor=1), q, 10)[1], truth) < reranked - 0.3
    with pytest.raises(ValueError, match="k_factor must be >= 1"):
        configure_search(on_disk, k_factor=0)
    # What reading touched is unmapped again (FAISS copied the IVF lists out: they count once, not
    # twice); the re-ranking codes map back as search reads them. Linux: /proc/self/smaps.
    del on_disk, plain, refine  # their mappings of the same file would count too
    gc.collect()
    reloaded = load_index(path)
    if sys.platform.startswith("linux"):
        assert mapped_kib(path) == 0
        assert np.array_equal(search(reloaded, q, 10)[1], in_memory.search(q, 10)[1])
        assert mapped_kib(path) > 0


def test_a_failed_write_leaves_neither_index_nor_codes(tmp_path, data):
    x, _ = data
    path = tmp_path / "index.faiss"

    def broken():
        yield x[:2000]
        yield x[:10, :8]  # the wrong dimension, mid-stream

    with pytest.raises(ValueError, match="shape"):
        write_index_from_batches(broken(), DIM, 4000, path, 1000, "compressed", train_sample=x[::2])
    assert list(tmp_path.iterdir()) == []
    # A non-refine index is written through the same function.
    flat = write_index_from_batches(_batches(x, 999), DIM, len(x), path, exact_below=len(x) + 1)
    assert isinstance(flat, faiss.IndexFlatIP) and flat.ntotal == len(x)
