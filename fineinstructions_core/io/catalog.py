"""The DuckDB catalog: views over the Parquet lake, one per asset, its rejections, and lineage.

Views read the Parquet globs at query time, so new shards appear without any DuckDB write. The stages
whose views it holds are the registry's (callers pass `registry.names()`). The file is
(re)written only when a view is missing, which the orchestration layer does in a pool of size one;
readers open it read-only and briefly.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

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


def _glob(lake: Path, name: str) -> str:
    return str((lake / name / "*.parquet").resolve()).replace("'", "''")


def _wanted_views(lake: Path, assets: Sequence[str]) -> set[str]:
    names = {n for a in assets for n in (a, f"{a}_rejections") if any((lake / n).glob("*.parquet"))}
    if any((lake / "_accounting").glob("*/*.json")):
        names.add("accounting")
    return names


def refresh_catalog(catalog: Path, lake: Path, assets: Sequence[str]) -> list[str]:
    """Create any missing view whose Parquet folder now has files; returns the views created.

    The list of views already created sits beside the catalog, so the common case (nothing new) never
    opens DuckDB at all; the rare write holds an exclusive file lock, one writer across processes.
    """
    catalog.parent.mkdir(parents=True, exist_ok=True)
    marker = catalog.with_suffix(".views.json")
    known = set(json.loads(marker.read_text())) if marker.exists() and catalog.exists() else set()
    if _wanted_views(lake, assets) <= known and "lineage" in known:
        return []
    created = []
    with open(catalog.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created = _create_views(catalog, lake, assets)
        with duckdb.connect(str(catalog), read_only=True) as db:
            views = [r[0] for r in db.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        marker.write_text(json.dumps(sorted(views)))
    return created


def _create_views(catalog: Path, lake: Path, assets: Sequence[str]) -> list[str]:
    created = []
    with duckdb.connect(str(catalog)) as db:
        existing = {r[0] for r in db.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        for asset in assets:
            for name in (asset, f"{asset}_rejections"):
                if name in existing or not any((lake / name).glob("*.parquet")):
                    continue
                db.execute(
                    f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{_glob(lake, name)}', "
                    "union_by_name = true, filename = false)"
                )
                created.append(name)
        if "accounting" not in existing and any((lake / "_accounting").glob("*/*.json")):
            path = str((lake / "_accounting" / "*" / "*.json").resolve()).replace("'", "''")
            db.execute(
                f"CREATE OR REPLACE VIEW accounting AS SELECT * FROM read_json_auto('{path}', union_by_name = true)"
            )
            created.append("accounting")
        needed = {
            "instruction_pairs",
            "template_matches",
            "documents",
            "template_index",
            "query_set",
            "raw_queries",
            "judged_corpus",
            "judged_corpus_rejections",
        }
        have = existing | set(created)
        if "lineage" not in have and needed <= have:
            db.execute(LINEAGE_SQL)
            created.append("lineage")
    return created


def connect_readonly(catalog: Path) -> duckdb.DuckDBPyConnection:
    if not catalog.exists():
        raise FileNotFoundError(f"no catalog at {catalog}: materialize some assets first (fineinstructions run)")
    return duckdb.connect(str(catalog), read_only=True)


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
