"""Atomic lake writes, the DuckDB catalog views and stats, and shards that never move."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from fineinstructions_core.config import load_config
from fineinstructions_core.io.catalog import connect_readonly, refresh_catalog, stats
from fineinstructions_core.io.lake import Accounting, Lake
from fineinstructions_core.registry import REGISTRY
from fineinstructions_core.shards import get_shard, plan_all_shards, plan_shards


def test_lake_roundtrip_and_catalog(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write("query_set", "s1", pd.DataFrame({"query_id": ["a", "b"], "query": ["x", "y"]}))
    lake.write("query_set", "s2", pd.DataFrame({"query_id": ["c"], "query": ["z"]}))
    lake.write_rejections("query_set", "s1", pd.DataFrame({"query_id": ["d"], "reason": ["duplicate"]}))
    lake.write_accounting(Accounting("query_set", "s1", "queries", 3, 2, {"duplicate": 1}))
    assert not list((tmp_path / "lake" / "query_set").glob(".*tmp"))  # no temporary file left behind
    created = refresh_catalog(tmp_path / "catalog.duckdb", tmp_path / "lake", REGISTRY.names())
    assert {"query_set", "query_set_rejections", "accounting"} <= set(created)
    # nothing new: no write
    assert refresh_catalog(tmp_path / "catalog.duckdb", tmp_path / "lake", REGISTRY.names()) == []
    with connect_readonly(tmp_path / "catalog.duckdb") as db:
        assert db.execute("SELECT count(*) FROM query_set").fetchone()[0] == 3
        assert db.execute("SELECT reason FROM query_set_rejections").fetchall() == [("duplicate",)]
    s = stats(lake.all_accounting())
    assert s["query_set"]["balanced"] and s["query_set"]["rejected_by_reason"] == {"duplicate": 1}


def test_shards_are_stable_when_files_are_added(tiny_project):
    cfg = load_config(tiny_project)
    first = [s.key for s in plan_all_shards(cfg)]
    assert first == ["debian-00000", "books-00000"]
    assert get_shard(cfg, "debian-00000").size == 2
    book2 = tiny_project.parent / "d" / "books" / "zz-second.txt"
    book2.write_text("A second, short book about gardening.\n", encoding="utf-8")
    again = [s.key for s in plan_shards(cfg, cfg.corpus("books"))]
    assert again == ["books-00000", "books-00001"]
    assert get_shard(cfg, "books-00001").segments[0].file.endswith("zz-second.txt")
    assert get_shard(cfg, "books-00000").segments[0].file.endswith("alice.txt")


def test_demo_slice_is_fixed_at_first_sight_and_new_files_still_count(tiny_project):
    cfg = load_config(tiny_project, {"scale": "demo", "demo": {"files_per_corpus": 1, "docs_per_file": 1}})
    books = tiny_project.parent / "d" / "books"
    (books / "b-second.txt").write_text("Already here at first sight, beyond the demo slice.\n", encoding="utf-8")
    keys = [s.key for s in plan_shards(cfg, cfg.corpus("books"))]
    assert keys == ["books-00000"] and get_shard(cfg, "books-00000").segments[0].file.endswith("alice.txt")
    (books / "c-new.txt").write_text("Added after the first run.\n", encoding="utf-8")
    keys = [s.key for s in plan_shards(cfg, cfg.corpus("books"))]
    assert keys == ["books-00000", "books-00001"]
    assert get_shard(cfg, "books-00001").segments[0].file.endswith("c-new.txt")
    debian = [s for s in plan_shards(cfg, cfg.corpus("debian"))]
    assert [s.size for s in debian] == [1]  # docs_per_file


_READER = textwrap.dedent(
    """
    import sys, duckdb
    sys.path.insert(0, sys.argv[2])
    from fineinstructions_core.io.catalog import connect_readonly
    from pathlib import Path
    db = connect_readonly(Path(sys.argv[1]))
    print("ready", flush=True)
    for line in sys.stdin:  # each line is a query; answer with its first value
        print(db.execute(line).fetchone()[0], flush=True)
    """
)


def _reader(catalog: Path) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parent.parent)
    p = subprocess.Popen(
        [sys.executable, "-c", _READER, str(catalog), root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "ready"
    return p


def _ask(p: subprocess.Popen, sql: str) -> str:
    p.stdin.write(sql + "\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


def test_catalog_rebuilds_while_another_process_reads_it(tmp_path):
    lake, catalog = Lake(tmp_path / "lake"), tmp_path / "catalog.duckdb"
    lake.write("query_set", "s1", pd.DataFrame({"query_id": ["a", "b"], "query": ["x", "y"]}))
    refresh_catalog(catalog, lake.root, REGISTRY.names())
    held = _reader(catalog)  # a read-only connection held open in another process
    try:
        assert _ask(held, "SELECT count(*) FROM query_set") == "2"
        lake.write("raw_queries", "s1", pd.DataFrame({"query_id": ["a"], "text": ["x"]}))
        # used to fail: "Could not set lock on file"
        created = refresh_catalog(catalog, lake.root, REGISTRY.names())
        assert created == ["raw_queries"]
        assert _ask(held, "SELECT count(*) FROM query_set") == "2"  # the old file keeps serving its reader
        fresh = _reader(catalog)
        try:
            assert _ask(fresh, "SELECT count(*) FROM raw_queries") == "1"  # a new reader sees the new view
        finally:
            fresh.stdin.close()
            fresh.wait(timeout=30)
    finally:
        held.stdin.close()
        held.wait(timeout=30)
    assert held.returncode == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".wal"))]


def test_catalog_migrates_from_absolute_paths(tmp_path):
    """A catalog written with absolute paths (marker as a plain list) is rebuilt once."""
    lake, catalog = Lake(tmp_path / "lake"), tmp_path / "catalog.duckdb"
    lake.write("query_set", "s1", pd.DataFrame({"query_id": ["a"], "query": ["x"]}))
    with duckdb.connect(str(catalog)) as db:
        glob = str(tmp_path / "lake" / "query_set" / "*.parquet")
        db.execute(f"CREATE VIEW query_set AS SELECT * FROM read_parquet('{glob}')")
    catalog.with_suffix(".views.json").write_text('["query_set"]')
    assert refresh_catalog(catalog, lake.root, REGISTRY.names()) == ["query_set"]
    with connect_readonly(catalog) as db:
        sql = db.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'query_set'").fetchone()[0]
    assert str(tmp_path) not in sql and "fi_catalog_dir" in sql


def test_a_copied_data_directory_reads_its_own_lake(tmp_path, monkeypatch):
    original = tmp_path / "original" / "data"
    lake = Lake(original / "lake")
    lake.write("query_set", "s1", pd.DataFrame({"query_id": ["a", "b"], "query": ["original", "original"]}))
    lake.write_accounting(Accounting("query_set", "s1", "queries", 2, 2))
    refresh_catalog(original / "catalog.duckdb", lake.root, REGISTRY.names())
    copy = tmp_path / "elsewhere" / "data"
    shutil.copytree(original, copy)
    Lake(copy / "lake").write("query_set", "s1", pd.DataFrame({"query_id": ["c"], "query": ["copy"]}))
    # Neither the working directory nor the original's presence may decide which lake is read.
    monkeypatch.chdir(original)
    with connect_readonly(copy / "catalog.duckdb") as db:
        assert db.execute("SELECT query FROM query_set").fetchall() == [("copy",)]
        assert db.execute("SELECT count(*) FROM accounting").fetchone()[0] == 1
    shutil.rmtree(tmp_path / "original")
    monkeypatch.chdir(tmp_path)
    with connect_readonly(copy / "catalog.duckdb") as db:
        assert db.execute("SELECT query FROM query_set").fetchall() == [("copy",)]
    assert refresh_catalog(copy / "catalog.duckdb", copy / "lake", REGISTRY.names()) == []  # complete where it is


def test_a_bare_connection_cannot_silently_read_another_lake(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write("query_set", "s1", pd.DataFrame({"query_id": ["a"], "query": ["x"]}))
    refresh_catalog(tmp_path / "catalog.duckdb", lake.root, REGISTRY.names())
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as db:
        with pytest.raises(duckdb.Error):
            db.execute("SELECT * FROM query_set").fetchall()
        db.execute("SET VARIABLE fi_catalog_dir = ?", [str(tmp_path)])
        assert db.execute("SELECT query FROM query_set").fetchall() == [("x",)]


def test_lake_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o002)
    try:
        lake = Lake(tmp_path / "lake")
        written = [
            lake.write("query_set", "s1", pd.DataFrame({"query_id": ["a"], "query": ["x"]})),
            lake.write_rejections("query_set", "s1", pd.DataFrame({"query_id": ["d"], "reason": ["duplicate"]})),
            lake.write_accounting(Accounting("query_set", "s1", "queries", 2, 1, {"duplicate": 1})),
        ]
        refresh_catalog(tmp_path / "catalog.duckdb", lake.root, REGISTRY.names())
        written += [tmp_path / "catalog.duckdb", tmp_path / "catalog.views.json"]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
        assert modes == dict.fromkeys(modes, 0o664)
        os.umask(0o077)
        private = lake.write("query_set", "s2", pd.DataFrame({"query_id": ["b"], "query": ["y"]}))
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_index_manifest_and_model_folders_get_the_umask_mode(tiny_project, tmp_path):
    import numpy as np

    from fineinstructions_core.index import build_index_from_batches, save_index
    from fineinstructions_core.training import save_model_dir

    class Saves:
        def save_pretrained(self, folder):
            (Path(folder) / f"{type(self).__name__}.json").write_text("{}")

    old = os.umask(0o002)
    try:
        cfg = load_config(tiny_project)
        plan_all_shards(cfg)
        manifest = cfg.data_dir / "shards" / "debian.json"
        index = build_index_from_batches(iter([np.eye(4, dtype=np.float32)]), 4, 4, 100, None, 1)
        faiss_file = save_index(index, tmp_path / "index" / "index.faiss")
        save_model_dir(Saves(), Saves(), tmp_path / "out" / "model")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (manifest, faiss_file, tmp_path / "out" / "model")}
    finally:
        os.umask(old)
    assert modes == {"debian.json": 0o664, "index.faiss": 0o664, "model": 0o775}


def test_a_replaced_model_folder_is_always_whole_for_a_reader_in_another_process(tmp_path):
    """Two runs on one data directory: one rewrites trained_model while the other loads it."""
    from fineinstructions_core.training import save_model_dir

    class Saves:
        def __init__(self, generation: int):
            self.generation = generation

        def save_pretrained(self, folder):
            for name in ("config.json", "tokenizer.json", "model.safetensors"):
                (Path(folder) / name).write_text(str(self.generation) * 20_000)

    target = tmp_path / "trained_model" / "model"
    save_model_dir(Saves(0), Saves(0), target)
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            target, misses, reads = Path({str(target)!r}), 0, 0
            end = time.monotonic() + 4
            while time.monotonic() < end:
                for name in ("config.json", "tokenizer.json", "model.safetensors"):
                    try:
                        (target / name).read_bytes()
                        reads += 1
                    except OSError:
                        misses += 1
            print(reads, misses)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )
    generation = 0
    while reader.poll() is None:
        generation += 1
        save_model_dir(Saves(generation), Saves(generation), target)
    reads, misses = map(int, reader.communicate()[0].split())
    assert generation > 10 and reads > 100
    assert misses == 0
    assert (target / "config.json").read_text()[:1] == str(generation)[:1]
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no old copy or temporary folder left
