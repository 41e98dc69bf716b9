"""The DuckDB catalog: views over the Parquet lake, one per asset, its rejections, and lineage.

Views read the Parquet globs at query time, so new shards appear without any DuckDB write. The file is
rebuilt only when a view is missing, which the orchestration layer does in a pool of size one.

- **Readers never block the writer.** A new catalog is built into a temporary file beside the live one
  and renamed over it (`os.replace`): a reader that has the old file open keeps reading it, the next
  reader opens the new one, and no process ever needs a write lock on a file a reader holds (DuckDB
  refuses one while any read-only connection is open). Writers still take an exclusive `fcntl` lock,
  one at a time across processes.
- **The lake is found relative to the catalog.** Views name their Parquet globs relative to the
  catalog's folder, through the DuckDB variable `fi_catalog_dir`, which `connect_readonly` sets to the
  folder the catalog file is in. A data directory that is moved or copied therefore reads its own
  lake, never the one it was copied from. (DuckDB's own `file_search_path` is not enough: a plain
  relative path is looked up in the process's working directory first, so a working directory that
  happens to hold a `lake/` folder would win.) Open the catalog with `connect_readonly`; a bare
  `duckdb.connect` must `SET VARIABLE fi_catalog_dir = '<the catalog's folder>'` first.
- Within one process, DuckDB shares one database instance per path while a connection to it is open:
  a connection opened after a rebuild sees the new views only once the older connections are closed.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from .files import honour_umask

DIR_VARIABLE = "fi_catalog_dir"
CATALOG_FORMAT = 2  # 1: a list of views with absolute paths; 2: paths relative to the catalog's folder

LINEAGE_SQL = """
CREATE OR REPLACE VIEW lineage AS
SELECT p.pair_id, j.accepted, j.score, p.excerpt_ratio, p.instruction, p.answer, p.excerpt_spans,
       m.match_id, m.similarity, m.chunk,
       d.document_id, d.corpus, d.shard, d.file AS document_file, d.record AS document_record, d.title,
       t.template_id, t.template, t.description, t.complexity,
       q.query_id, q.query, q.source, r.file AS query_file, r.record AS query_record
FROM instruction_pairs p
JOIN template_matches m USING (match_id)
JOIN documents d ON d.document_id = p.document_id
JOIN template_index t ON t.template_id = p.template_id
JOIN query_set q ON q.query_id = t.query_id
JOIN raw_queries r ON r.query_id = q.query_id
LEFT JOIN (SELECT pair_id, score, accepted FROM judged_corpus
           UNION ALL SELECT pair_id, score, FALSE FROM judged_corpus_rejections) j USING (pair_id)
"""

LINEAGE_NEEDS = {
    "instruction_pairs",
    "template_matches",
    "documents",
    "template_index",
    "query_set",
    "raw_queries",
    "judged_corpus",
    "judged_corpus_rejections",
}


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _relative(lake: Path, catalog: Path) -> str:
    """The lake's folder relative to the catalog's, with forward slashes ('lake', '../shared/lake')."""
    return Path(os.path.relpath(lake.resolve(), catalog.parent.resolve())).as_posix()


def _located(rel_pattern: str) -> str:
    """SQL for a path under the catalog's folder, resolved when the view is read (see DIR_VARIABLE)."""
    return f"getvariable('{DIR_VARIABLE}') || {_sql_str('/' + rel_pattern)}"


def _wanted_views(lake: Path, assets: Sequence[str]) -> set[str]:
    names = {n for a in assets for n in (a, f"{a}_rejections") if any((lake / n).glob("*.parquet"))}
    if any((lake / "_accounting").glob("*/*.json")):
        names.add("accounting")
    if LINEAGE_NEEDS <= names:
        names.add("lineage")
    return names


def _marker(catalog: Path) -> Path:
    return catalog.with_suffix(".views.json")


def _read_marker(catalog: Path) -> dict[str, Any] | None:
    """What the catalog file holds, as its last writer recorded it; None if unknown or an older format."""
    marker = _marker(catalog)
    if not (marker.exists() and catalog.exists()):
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CATALOG_FORMAT:
        return None  # a catalog with absolute paths: rebuilt once
    return data


def refresh_catalog(catalog: Path, lake: Path, assets: Sequence[str]) -> list[str]:
    """Rebuild the catalog if a view is missing; returns the views it did not list before. `assets` are
    the stages whose views it holds: the registry's (`registry.names()`).

    The list of views already built sits beside the catalog (`catalog.views.json`), so the common case
    (nothing new) never opens DuckDB at all; the rare rebuild holds an exclusive file lock, one writer
    across processes, and never writes to the live file (see the module docstring).
    """
    catalog.parent.mkdir(parents=True, exist_ok=True)
    rel = _relative(lake, catalog)

    def missing() -> tuple[set[str], set[str]] | None:
        state = _read_marker(catalog)
        known = set(state["views"]) if state and state.get("lake") == rel else set()
        wanted = _wanted_views(lake, assets)
        return None if wanted <= known else (wanted, known)

    if missing() is None:
        return []
    with open(catalog.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = missing()  # another writer may have rebuilt it while this one waited for the lock
        if todo is None:
            return []
        _, known = todo
        views = _build(catalog, lake, rel, assets)
        _write_marker(catalog, {"format": CATALOG_FORMAT, "lake": rel, "views": sorted(views)})
    return [v for v in views if v not in known]


def _write_marker(catalog: Path, state: dict[str, Any]) -> None:
    marker = _marker(catalog)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(state), encoding="utf-8")
        honour_umask(tmp, directory=False)
        os.replace(tmp, marker)
    finally:
        tmp.unlink(missing_ok=True)


def _build(catalog: Path, lake: Path, rel: str, assets: Sequence[str]) -> list[str]:
    """Every view the lake has files for, in a new file renamed over the catalog; the views, in order."""
    tmp = catalog.with_name(f".{catalog.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    wal = Path(f"{tmp}.wal")
    created: list[str] = []
    try:
        with duckdb.connect(str(tmp)) as db:
            # The views bind against the real lake now, and against the catalog's folder when read.
            db.execute(f"SET VARIABLE {DIR_VARIABLE} = ?", [str(catalog.parent.resolve())])
            for asset in assets:
                for name in (asset, f"{asset}_rejections"):
                    if not any((lake / name).glob("*.parquet")):
                        continue
                    db.execute(
                        f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_located(f'{rel}/{name}/*.parquet')}, "
                        "union_by_name = true, filename = false)"
                    )
                    created.append(name)
            if any((lake / "_accounting").glob("*/*.json")):
                db.execute(
                    "CREATE VIEW accounting AS SELECT * FROM "
                    f"read_json_auto({_located(f'{rel}/_accounting/*/*.json')}, union_by_name = true)"
                )
                created.append("accounting")
            if LINEAGE_NEEDS <= set(created):
                db.execute(LINEAGE_SQL)
                created.append("lineage")
            db.execute("CHECKPOINT")
        honour_umask(tmp, directory=False)
        # A write-ahead log left beside the live file by an older writer would be replayed into the new one.
        Path(f"{catalog}.wal").unlink(missing_ok=True)
        os.replace(tmp, catalog)
    finally:
        tmp.unlink(missing_ok=True)
        wal.unlink(missing_ok=True)
    return created


def connect_readonly(catalog: Path) -> duckdb.DuckDBPyConnection:
    """The one way to read the catalog: read-only, with its views resolving the lake beside it."""
    catalog = Path(catalog)
    if not catalog.exists():
        raise FileNotFoundError(f"no catalog at {catalog}: materialize some assets first (fineinstructions run)")
    db = duckdb.connect(str(catalog), read_only=True)
    try:
        db.execute(f"SET VARIABLE {DIR_VARIABLE} = ?", [str(catalog.parent.resolve())])
    except BaseException:
        db.close()
        raise
    return db


def stats(accounting: list[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, Any]:
    """Per stage: rows in, out, rejected by reason, summed over partitions, and whether it balances;
    stages in `order` (the registry's) first, in that order."""
    stages: dict[str, Any] = {}
    for rec in accounting:
        s = stages.setdefault(
            rec["asset"],
            {
                "unit": rec["unit"],
                "partitions": 0,
                "rows_in": 0,
                "rows_out": 0,
                "rows_rejected": 0,
                "rejected_by_reason": {},
                "llm": None,
            },
        )
        s["partitions"] += 1
        s["rows_in"] += rec["rows_in"]
        s["rows_out"] += rec["rows_out"]
        s["rows_rejected"] += rec["rows_rejected"]
        for reason, n in rec["rejected"].items():
            s["rejected_by_reason"][reason] = s["rejected_by_reason"].get(reason, 0) + n
        llm = (rec.get("extra") or {}).get("llm")
        if llm:
            agg = s["llm"] or {
                k: 0 for k in ("requests", "cache_hits", "cache_misses", "errors", "prompt_tokens", "completion_tokens")
            }
            for k in agg:
                agg[k] += int(llm.get(k) or 0)
            s["llm"] = agg
    for s in stages.values():
        s["balanced"] = s["rows_in"] == s["rows_out"] + s["rows_rejected"]
        if s["llm"] is None:
            del s["llm"]
    rank = {a: i for i, a in enumerate(order)}
    return {k: stages[k] for k in sorted(stages, key=lambda a: rank.get(a, len(rank)))}


def lineage(catalog: Path, pair_id: str) -> dict[str, Any] | None:
    with connect_readonly(catalog) as db:
        cur = db.execute("SELECT * FROM lineage WHERE pair_id = ?", [pair_id])
        row = cur.fetchone()
        if row is None:
            return None
        cols = [c[0] for c in cur.description]
    return json.loads(json.dumps(dict(zip(cols, row, strict=True)), default=str))
