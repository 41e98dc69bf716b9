"""Atomic lake writes, the DuckDB catalog views and stats, and shards that never move."""

import duckdb
import pandas as pd

from fineinstructions_core.config import load_config
from fineinstructions_core.io.catalog import refresh_catalog, stats
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
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as db:
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
