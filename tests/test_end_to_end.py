"""The whole graph with the real embedded models on a tiny input, through the `fineinstructions` CLI.

One test on purpose: it also proves incremental reruns (nothing stale -> no run) and that a new corpus
file materializes only its new shard and what depends on it.
"""

import json

import duckdb

from fineinstructions_assets.cli import main
from fineinstructions_core import judge
from fineinstructions_core.config import load_config
from fineinstructions_core.io.lake import Lake


def _run(capsys, *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_whole_graph_end_to_end(tiny_project, dagster_home, capsys, monkeypatch):
    cfg_arg = ["--config", str(tiny_project)]
    out = _run(capsys, *cfg_arg, "run")
    assert "materializing training_corpus" in out

    stats = json.loads(_run(capsys, *cfg_arg, "stats", "--json"))
    assert stats["all_balanced"], stats
    stages = stats["stages"]
    assert set(stages) == {
        "raw_queries",
        "query_set",
        "template_bank",
        "template_index",
        "documents",
        "document_index",
        "template_matches",
        "instruction_pairs",
        "judged_corpus",
        "training_corpus",
    }
    assert stages["raw_queries"]["rows_in"] == 12
    assert stages["query_set"]["rejected_by_reason"].get("too_short", 0) >= 0
    assert stages["template_bank"]["llm"]["cache_misses"] == stages["query_set"]["rows_out"]
    assert stages["template_index"]["rows_out"] >= 1, "the embedded genericizer produced no valid template"
    assert stages["document_index"]["rows_out"] == stages["documents"]["rows_out"] == 3
    # threshold 0 in the tiny config: every document gets templates, one per vector at most 6
    assert stages["template_matches"]["rows_out"] == 3
    pairs_in = stages["instruction_pairs"]["rows_in"]
    assert 3 <= pairs_in <= 18
    assert stages["instruction_pairs"]["rows_out"] >= 1, stages["instruction_pairs"]

    cfg = load_config(tiny_project)
    pairs = Lake(cfg.lake_dir).read_all("instruction_pairs")
    docs = Lake(cfg.lake_dir).read_all("documents").set_index("document_id")
    for row in pairs.itertuples():
        assert row.excerpt_ratio >= 0.8
        text = docs.at[row.document_id, "text"]
        for start, end in row.excerpt_spans:  # every span is verbatim document text inside the answer
            assert text[start:end] in row.answer
    # the long book was embedded window by window, over its whole length
    index = Lake(cfg.lake_dir).read_all("document_index")
    assert index["n_windows"].max() > 10

    pair_id = pairs["pair_id"].iloc[0]
    lineage = json.loads(_run(capsys, *cfg_arg, "lineage", pair_id))
    assert lineage["pair_id"] == pair_id and lineage["source"] in {"nq", "wf"}
    assert lineage["query"] and lineage["template"] and lineage["document_id"] == pairs["document_id"].iloc[0]
    with duckdb.connect(str(cfg.catalog_path), read_only=True) as db:
        views = {r[0] for r in db.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"judged_corpus", "instruction_pairs_rejections", "lineage", "accounting"} <= views
    assert (cfg.data_dir / "exports" / "training_corpus.jsonl").exists()

    # Nothing changed: nothing is materialized.
    out = _run(capsys, *cfg_arg, "run")
    assert "materializing" not in out and "0 runs" in out

    # Forced rerun of everything: every LLM request is answered from the request cache.
    _run(capsys, *cfg_arg, "run", "--all")
    again = json.loads(_run(capsys, *cfg_arg, "stats", "--json"))["stages"]
    for stage in ("template_bank", "instruction_pairs", "judged_corpus"):
        llm = again[stage]["llm"]
        assert llm["cache_misses"] == 0 and llm["cache_hits"] == llm["requests"], (stage, llm)
        assert again[stage]["rows_out"] == stages[stage]["rows_out"]

    # A new corpus file: only its shard's chain and the training corpus run.
    (tiny_project.parent / "d" / "books" / "zz-new.txt").write_text(
        "Tomatoes need full sun and regular watering. Plant them after the last frost, about sixty "
        "centimetres apart, and support the stems with stakes as they grow.\n",
        encoding="utf-8",
    )
    out = _run(capsys, *cfg_arg, "run")
    launched = [line for line in out.splitlines() if line.startswith("materializing")]
    assert launched == [
        "materializing documents, document_index, template_matches, instruction_pairs, judged_corpus [books-00001]",
        "materializing training_corpus",
    ], out

    # Only the judge prompt changes: only judge requests are generated again, nothing upstream reruns.
    before = json.loads(_run(capsys, *cfg_arg, "stats", "--json"))["stages"]
    monkeypatch.setattr(judge, "PROMPT", judge.PROMPT.replace("Please accurately evaluate", "Evaluate carefully"))
    out = _run(capsys, *cfg_arg, "run")
    launched = [line for line in out.splitlines() if line.startswith("materializing")]
    assert sorted(launched) == sorted(
        [f"materializing judged_corpus [{s}]" for s in ("debian-00000", "books-00000", "books-00001")]
        + ["materializing training_corpus"]
    ), out
    final = json.loads(_run(capsys, *cfg_arg, "stats", "--json"))["stages"]
    judged = final["judged_corpus"]["llm"]
    assert judged["requests"] == final["judged_corpus"]["rows_in"] == judged["cache_misses"]
    for stage in ("template_bank", "instruction_pairs"):
        assert final[stage] == before[stage]  # not rerun: same accounting, no new requests
