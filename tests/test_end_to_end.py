"""The whole graph with the real embedded models on a tiny input, through the `fineinstructions` CLI.

One test on purpose: it also proves incremental reruns (nothing stale -> no run) and that a new corpus
file materializes only its new shard and what depends on it.
"""

import json
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from fineinstructions_assets.assets import matching_embedding
from fineinstructions_assets.cli import main
from fineinstructions_assets.resources import FineInstructionsResource
from fineinstructions_core import gates, judge
from fineinstructions_core.config import load_config
from fineinstructions_core.io.catalog import connect_readonly
from fineinstructions_core.io.lake import Lake

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def _run(capsys, *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def _training_runs(before, after) -> list[str]:
    """The training assets rerun exactly when the training corpus came out different."""
    if before.equals(after):
        return []
    return [f"materializing {a}" for a in ("trained_model", "baseline_model", "model_comparison")]


def test_whole_graph_end_to_end(tiny_project, dagster_home, capsys, monkeypatch):
    cfg_arg = ["--config", str(tiny_project)]
    out = _run(capsys, *cfg_arg, "run")
    assert "materializing training_corpus" in out
    # Every run is a run of a defined job of the code location (the UI can re-execute it), none ephemeral.
    runs = DagsterInstance.get().get_runs()
    assert runs and {r.job_name for r in runs} == {"query_source_job", "corpus_shard_job", "index_and_training_job"}
    assert {r.remote_job_origin.repository_origin.get_label() for r in runs if r.remote_job_origin} == {
        "__repository__@fineinstructions_assets.definitions"
    }
    assert all(r.remote_job_origin for r in runs)

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
        "trained_model",
        "baseline_model",
        "model_comparison",
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
    with connect_readonly(cfg.catalog_path) as db:
        views = {r[0] for r in db.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert db.execute("SELECT count(*) FROM lineage").fetchone()[0] == len(pairs)
    assert {"judged_corpus", "instruction_pairs_rejections", "lineage", "accounting"} <= views
    assert (cfg.data_dir / "exports" / "training_corpus.jsonl").exists()
    assert (cfg.data_dir / "exports" / "training_corpus_sft" / "README.md").exists()
    # the training assets ran on what the judge kept, with the same number of tokens each
    trained, baseline = (Lake(cfg.lake_dir).read(a).iloc[0] for a in ("trained_model", "baseline_model"))
    assert trained["tokens_seen"] == baseline["tokens_seen"] > 0
    assert list(Lake(cfg.lake_dir).read("model_comparison")["model_id"]) == [
        "base_model",
        "baseline_model",
        "trained_model",
    ]

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
    corpus_before = Lake(cfg.lake_dir).read("training_corpus")
    out = _run(capsys, *cfg_arg, "run")
    launched = [line for line in out.splitlines() if line.startswith("materializing")]
    assert launched == [
        "materializing documents, document_index, template_matches, instruction_pairs, judged_corpus [books-00001]",
        "materializing training_corpus",
    ] + _training_runs(corpus_before, Lake(cfg.lake_dir).read("training_corpus")), out

    # Only the judge prompt changes: only judge requests are generated again, nothing upstream reruns.
    before = json.loads(_run(capsys, *cfg_arg, "stats", "--json"))["stages"]
    corpus_before = Lake(cfg.lake_dir).read("training_corpus")
    monkeypatch.setattr(judge, "PROMPT", judge.PROMPT.replace("Please accurately evaluate", "Evaluate carefully"))
    out = _run(capsys, *cfg_arg, "run")
    launched = [line for line in out.splitlines() if line.startswith("materializing")]
    assert sorted(launched) == sorted(
        [f"materializing judged_corpus [{s}]" for s in ("debian-00000", "books-00000", "books-00001")]
        + ["materializing training_corpus"]
        + _training_runs(corpus_before, Lake(cfg.lake_dir).read("training_corpus"))
    ), out
    final = json.loads(_run(capsys, *cfg_arg, "stats", "--json"))["stages"]
    judged = final["judged_corpus"]["llm"]
    # The judge sees only the pairs every gate passed; a gate's rejection costs no judge call.
    by_reason = final["judged_corpus"]["rejected_by_reason"]
    gated = sum(n for r, n in by_reason.items() if r in gates.REASONS.values())
    assert judged["requests"] == final["judged_corpus"]["rows_in"] - gated == judged["cache_misses"]
    for stage in ("template_bank", "instruction_pairs"):
        assert final[stage] == before[stage]  # not rerun: same accounting, no new requests

    # The paper's embedding labels: the teacher's judge labels the top template matches of the lake just
    # built, and the embedder trains two steps on them. Scores 1-3 count as incompatible here, so every
    # parseable judgment is a label; the accounting still balances.
    overrides = {
        "distillation": {
            "embedding": {
                "labels": "teacher_judgment",
                "teacher_judgment": {"incompatible_max_score": 3},
                "questions": str(ROOT / "sample_data/eval/squad_v2_half_questions.jsonl"),
                "paragraphs": str(ROOT / "sample_data/documents/squad_v2_half_paragraphs.jsonl"),
                "max_heldout_questions": 20,
                "max_steps": 2,
                "batch_size": 2,
                "round_two": False,
            }
        }
    }
    fi = FineInstructionsResource(config_path=str(tiny_project), overrides=json.dumps(overrides))
    result = materialize([matching_embedding], instance=DagsterInstance.get(), resources={"fi": fi})
    assert result.success
    meta = result.asset_materializations_for_node("matching_embedding")[0].metadata
    assert meta["labels"].value == "teacher_judgment"
    funnel = {r.data["step"]: r.data["rows"] for r in meta["funnel"].value.records}
    judged = funnel["in"]
    matches = Lake(cfg.lake_dir).read_all("template_matches")
    assert judged == int((matches["rank"] < 5).sum()) > 0  # each document's top five matches
    assert meta["llm"].value["requests"] == judged
    balance = meta["label_balance"].value
    rejected = sum(v for k, v in funnel.items() if k.startswith("rejected: "))
    assert balance["compatible"] + balance["incompatible"] + rejected == judged == funnel["out"] + rejected
    assert (cfg.data_dir / "models" / "matching_embedding" / "round1" / "model" / "config.json").exists()
