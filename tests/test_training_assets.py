"""The training assets through Dagster: trained_model, baseline_model and model_comparison on a tiny lake.

The documents and their index are the real stages' output on six SQuAD paragraphs; the judged pairs are
written into the lake from those paragraphs (one per paragraph, quoting its second sentence), so the
training assets get real text without the LLM stages' minutes. The whole graph, LLM stages included,
runs end to end in `test_end_to_end.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, SAMPLE, _head_jsonl, squad_project, write_config
from dagster import DagsterInstance, materialize

from fineinstructions_assets.assets import (
    baseline_model,
    document_index,
    documents,
    model_comparison,
    raw_queries,
    trained_model,
    training_corpus,
)
from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.resources import FineInstructionsResource
from fineinstructions_core import model_eval, training_stages
from fineinstructions_core.config import load_config
from fineinstructions_core.ids import content_id
from fineinstructions_core.io.lake import Lake
from fineinstructions_core.stage_base import ProgressReporter


def _project(root: Path) -> Path:
    _head_jsonl(SAMPLE / "queries" / "arena_hard_v0.1.jsonl", root / "q" / "arena.jsonl", 5)
    arena = {"name": "arena", "path": "q/arena.jsonl", "format": "jsonl", "text_field": "prompt"}
    path, base = squad_project(root, 6, query_sources=[arena])
    base["corpora"][0].update(title_field="title", license="CC-BY-SA-4.0")
    base["query_filters"]["eval_sets"] = []
    base["pretraining"].update(sequence_length=64, batch_size=4, heldout_documents=0.2, checkpoint_every=2)
    base["comparison"].update(
        knowledge_questions=str(SAMPLE / "eval" / "squad_v2_half_questions.jsonl"),
        instruction_prompts=str(SAMPLE / "queries" / "arena_hard_v0.1.jsonl"),
        max_questions=6,
        max_prompts=3,
        max_new_tokens=16,
    )
    return write_config(path, base)


def _judged_pairs(lake: Lake, shard: str) -> pd.DataFrame:
    """One accepted pair per paragraph: a question about its title, answered by its second sentence."""
    docs = lake.read("documents", shard)
    rows = []
    for d in docs.itertuples():
        sentences = d.text.split(". ")
        answer = (sentences[1] if len(sentences) > 1 else sentences[0]).strip()
        start = d.text.find(answer)
        rows.append(
            {
                "pair_id": content_id("pair", d.document_id),
                "match_id": content_id("match", d.document_id),
                "document_id": d.document_id,
                "template_id": "tpl_test",
                "corpus": d.corpus,
                "instruction": f"What does the passage about {d.title} say next?",
                "answer": answer,
                "excerpt_spans": [[start, start + len(answer)]],
                "excerpt_ratio": 1.0,
                "score": 5,
                "feedback": "",
                "accepted": True,
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    """Documents, their index and raw queries by their own assets; judged pairs written; then the
    training corpus and the three training assets materialized through Dagster."""
    import os
    import shutil

    root = tmp_path_factory.mktemp("training")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    project = _project(root)
    cfg = load_config(project)
    instance = DagsterInstance.get()
    register_partitions(cfg, instance)
    fi = {"fi": FineInstructionsResource(config_path=str(project))}
    assert materialize([raw_queries], partition_key="arena", instance=instance, resources=fi).success
    lake = Lake(cfg.lake_dir)
    for shard in ("wiki-00000", "wiki-00001"):
        assert materialize([documents, document_index], partition_key=shard, instance=instance, resources=fi).success
        lake.write("judged_corpus", shard, _judged_pairs(lake, shard))
    result = materialize(
        [training_corpus, trained_model, baseline_model, model_comparison], instance=instance, resources=fi
    )
    yield project, cfg, result
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


def test_three_assets_materialize_with_their_checks(trained_project):
    _, cfg, result = trained_project
    assert result.success
    checks = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    for asset in ("trained_model", "baseline_model", "model_comparison"):
        for check in ("ids_unique_not_null", "schema", "accounting"):
            assert checks[(asset, check)], (asset, check)
    meta = result.asset_materializations_for_node("model_comparison")[0].metadata
    assert "| trained_model |" in meta["comparison_table"].value
    assert meta["comparison_plot"].value.startswith("![plot](data:image/svg+xml;base64,")
    trained = result.asset_materializations_for_node("trained_model")[0].metadata
    assert trained["loss_curve"].value.startswith("![plot]")
    assert trained["tokens_per_second"].value > 0


def test_equal_token_control(trained_project):
    _, cfg, _ = trained_project
    lake = Lake(cfg.lake_dir)
    trained, baseline = lake.read("trained_model").iloc[0], lake.read("baseline_model").iloc[0]
    assert trained["tokens_seen"] == baseline["tokens_seen"] > 0
    assert trained["tokens_seen"] % cfg.pretraining.sequence_length == 0
    assert trained["steps"] == baseline["steps"]
    # the same documents held out by both, and a different corpus: raw text vs instruction pairs
    assert trained["heldout_documents"] == baseline["heldout_documents"] == 1
    assert trained["data_tokens"] != baseline["data_tokens"]
    # the model directories load as Hugging Face models and differ from the base and each other
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(trained["model_dir"])
    b = AutoModelForCausalLM.from_pretrained(baseline["model_dir"])
    name = "model.embed_tokens.weight"
    assert not torch.equal(a.state_dict()[name], b.state_dict()[name])


def test_comparison_numbers_come_from_the_models(trained_project):
    _, cfg, _ = trained_project
    lake = Lake(cfg.lake_dir)
    table = lake.read("model_comparison").set_index("model_id")
    assert list(table.index) == ["base_model", "baseline_model", "trained_model"]
    assert (table["knowledge_questions"] == 6).all()
    # different models answer differently: their likelihoods of the same references differ
    assert table["knowledge_loglik"].nunique() == 3
    assert (
        table["prompts_judged"].iloc[0]
        + len(lake.read_rejections("model_comparison").query("reason == 'judge_unparseable'"))
        == 3
    )
    # the prompts the arena source read are never evaluation prompts
    rej = lake.read_rejections("model_comparison")
    assert (rej["reason"] == "used_by_query_source").sum() == 5
    details = [json.loads(line) for line in (cfg.data_dir / "exports" / "model_comparison.jsonl").open()]
    assert {d["model_id"] for d in details} == {"base_model", "baseline_model", "trained_model"}
    # the same model asked twice gives the same numbers
    lm = model_eval.CausalLM(Path(table.at["trained_model", "model"]))
    knowledge = [d for d in details if d["model_id"] == "trained_model" and d["kind"] == "knowledge"]
    prompts = [model_eval.prompt(d["question"]) for d in knowledge]
    again = lm.answer_logprob(prompts, [d["references"][0] for d in knowledge])
    assert again == pytest.approx([d["loglik"] for d in knowledge], abs=1e-5)
    c = cfg.comparison
    calls: list[tuple[int, int]] = []
    answers = lm.greedy(prompts, c.max_new_tokens, c.batch_size, c.min_new_tokens, lambda d, t: calls.append((d, t)))
    assert answers == [d["answer"] for d in knowledge]
    assert calls[-1] == (len(prompts), len(prompts))  # progress reaches the end


def test_progress_logger_reports_the_end_and_throttles_the_rest():
    lines: list[str] = []
    report = ProgressReporter("answers", lines.append, every=3600, unit="answers")
    for done in range(1, 11):
        report(done, 10)
    assert len(lines) == 2  # the first call and the last: the others fall inside the interval
    assert lines[-1].startswith("answers: 10/10 answers, ") and "ETA 0s" in lines[-1]


def test_sft_export_loads_with_datasets(trained_project):
    datasets = pytest.importorskip("datasets")
    _, cfg, _ = trained_project
    folder = cfg.data_dir / "exports" / "training_corpus_sft"
    ds = datasets.load_dataset(str(folder), split="train")
    corpus = Lake(cfg.lake_dir).read("training_corpus")
    assert len(ds) == len(corpus) == 6
    row = ds[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][0]["content"] == row["instruction"] and row["messages"][1]["content"] == row["answer"]
    assert {"pair_id", "document_id", "template_id", "score"} <= set(ds.column_names)
    card = (folder / "README.md").read_text()
    assert "CC-BY-SA-4.0" in card and "| documents |" in card and "smollm2" in card


def test_evidence_sentence_and_scores():
    doc = "Paris is the capital of France. It lies on the Seine. The city has two million people."
    assert model_eval.evidence_sentence("On which river does it lie, the Seine?", doc) == "It lies on the Seine."
    assert model_eval.token_f1("the Seine river", ["Seine"]) == pytest.approx(2 / 3)
    assert model_eval.exact_match("The Seine.", ["seine"]) == 1.0
    assert model_eval.cut_answer(" Paris.\n\nInstruction: next") == "Paris."


def test_heldout_documents_are_order_free():
    ids = [f"doc_{i}" for i in range(20)]
    held = training_stages.heldout_documents(ids, 0.1, 0)
    assert held == training_stages.heldout_documents(list(reversed(ids)), 0.1, 0) and len(held) == 2
    assert training_stages.heldout_documents(["only"], 0.5, 0) == set()
    assert training_stages.heldout_documents(["a", "b"], 0.1, 0) == set()  # a demo's two: none held out


class _WordTokenizer:
    """Word ids for the packing rules alone (the assets above use the real tokenizer)."""

    eos_token_id = 0

    def __call__(self, text: str, **_: object):
        class _Enc:
            input_ids = [len(w) for w in text.split()]

        return _Enc()


def test_packing_gives_both_corpora_the_same_tokens():
    from fineinstructions_core.pretrain import pack

    short = ["one two three", "four five"]  # 7 tokens with EOS
    long = ["a b c d e f g h i j k l m n o p q r s t u v w x y z"] * 3  # 81 tokens
    a = pack(short, [], _WordTokenizer(), sequence_length=16, token_budget=48, seed=0)
    b = pack(long, [], _WordTokenizer(), sequence_length=16, token_budget=48, seed=0)
    assert a.tokens == b.tokens == 48 and all(len(x) == 16 for x in a.train + b.train)
    assert a.passes > 6 and b.passes < 1  # the short corpus repeats, the long one is cut
    tiny = pack(["w " * 19], [], _WordTokenizer(), sequence_length=256, token_budget=None, seed=0)
    assert tiny.sequence_length == tiny.tokens == 20 and len(tiny.train) == 1  # under one block: one block
    with pytest.raises(ValueError, match="not enough text"):
        pack(["x"], [], _WordTokenizer(), sequence_length=16, token_budget=None, seed=0)


def test_an_empty_training_corpus_trains_nothing_and_says_why(tmp_path):
    """A judge that kept nothing: the training assets finish with empty tables and the reason, so the
    rest of a run goes on (a small sample often ends this way)."""
    from fineinstructions_core.io.lake import UNPARTITIONED
    from fineinstructions_core.plan import run_stage

    cfg = load_config(_project(tmp_path))
    Lake(cfg.lake_dir).write("training_corpus", UNPARTITIONED, pd.DataFrame(columns=["pair_id", "document_id", "text"]))
    for stage in ("trained_model", "baseline_model", "model_comparison"):
        result = run_stage(cfg, stage, UNPARTITIONED, [], [])
        assert result.output.empty and result.accounting.balanced, stage
        assert "trained nothing" in result.extra["skipped"] or "corpus is empty" in result.extra["skipped"]
