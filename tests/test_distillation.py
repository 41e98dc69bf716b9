"""The distillation loop: the checked-in seeds pass the project's own validators, students train for a
few steps on a tiny set and reload, training resumes from its checkpoint, and the distillation assets
materialize through Dagster with their loss curves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, make_tiny_project
from dagster import DagsterInstance, materialize

from fineinstructions_assets.assets import (
    genericizer_model,
    matching_embedding,
    query_set,
    raw_queries,
    silver_genericizer_examples,
)
from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.resources import FineInstructionsResource
from fineinstructions_core import compatibility, distill, genericize
from fineinstructions_core.config import load_config
from fineinstructions_core.distill_stages import labelled_pairs, teacher_judged_pairs
from fineinstructions_core.embed import Embedder
from fineinstructions_core.evaluation import load_labelled_set, subset_by_titles
from fineinstructions_core.excerpts import expand_answer
from fineinstructions_core.llm.models import EMBEDDED_LLM, resolve_llm
from fineinstructions_core.llm.transformers_backend import TransformersBackend
from fineinstructions_core.templates import check_template
from fineinstructions_core.training import train_causal_lm

CACHE = Path(os.environ["FI_MODEL_CACHE"])


def test_seed_examples_pass_the_validators_and_the_excerpt_expander():
    gen = distill.load_genericizer_seeds()
    assert len(gen) >= 200 and gen["example_id"].is_unique
    counts = gen["source"].value_counts()
    assert set(counts.index) == {"nq_open", "wellformedness", "cqadupstack", "webquestions", "arena_hard"}
    assert counts.min() >= 25  # spread over every shipped source's style
    for row in gen.itertuples():
        assert check_template(row.template, row.description, row.query).ok, row.query
    kept, rejected = distill.check_genericizer_examples(gen)
    assert len(kept) == len(gen) and rejected.empty

    ins = distill.load_instantiation_seeds()
    assert len(ins) >= 60 and ins["example_id"].is_unique
    nulls = ins["instruction"].isna()
    assert 3 <= nulls.sum() <= len(ins) // 5  # a few refusals, as in the paper's training data
    for row in ins[~nulls].itertuples():
        exp = expand_answer(row.answer, row.document)
        assert exp.spans and exp.ratio >= 0.8, row.document_id
    kept, rejected = distill.check_instantiation_examples(ins)
    assert len(kept) == len(ins) and rejected.empty
    # Seeds never touch the evaluation data.
    titles = {
        json.loads(x)["pid"]: json.loads(x)["title"]
        for x in open(ROOT / "sample_data/documents/squad_v2_half_paragraphs.jsonl")
    }
    assert not {titles.get(d) for d in ins["document_id"]} & set(distill.HELDOUT_ARTICLES)
    assert not set(gen["query"]) & set(distill.heldout_queries(ROOT)["query"])


def test_student_trains_a_few_steps_resumes_and_reloads(tmp_path: Path):
    base, _ = resolve_llm(EMBEDDED_LLM, CACHE)
    examples = distill.genericizer_sft_examples(distill.load_genericizer_seeds().head(6))
    out = tmp_path / "student"
    stopped = train_causal_lm(base, examples, out, epochs=1, batch_size=2, eval_share=0.34, time_budget_s=0)
    assert not stopped.finished and stopped.steps == 1 and (out / "checkpoint.pt").exists()
    assert not (out / "model").exists()  # nothing half-trained is ever presented as a model
    done = train_causal_lm(base, examples, out, epochs=1, batch_size=2, eval_share=0.34)
    assert done.finished and done.resumed_from_step == 1 and done.steps == 2
    assert [s for s, _ in done.losses] == [1, 2] and len(done.eval_losses) == 2
    assert not (out / "checkpoint.pt").exists() and (out / "model" / "config.json").exists()

    student = TransformersBackend(str(out / "model"), CACHE, batch_size=1)
    req = genericize.build_request("how do i boil an egg", str(out / "model"), 12, 0.0, "fineinstructions")
    [result] = student.generate([req])
    assert result.error is None and result.completion_tokens > 0
    assert student.identity != TransformersBackend(EMBEDDED_LLM, CACHE).identity  # new weights, new cache keys


def test_distillation_assets_materialize(tmp_path: Path, dagster_home: Path):
    project = make_tiny_project(tmp_path, queries=3, docs=1)
    overrides = {
        "distillation": {
            "silver_genericizer_queries": 2,
            "genericizer": {"epochs": 1, "batch_size": 4, "max_steps": 2},
            "embedding": {
                "questions": str(ROOT / "sample_data/eval/squad_v2_half_questions.jsonl"),
                "paragraphs": str(ROOT / "sample_data/documents/squad_v2_half_paragraphs.jsonl"),
                "max_pairs": 16,
                "max_steps": 2,
                "batch_size": 4,
                "max_heldout_questions": 40,
            },
        }
    }
    fi = FineInstructionsResource(config_path=str(project), overrides=json.dumps(overrides))
    cfg = fi.load()
    instance = DagsterInstance.get()
    register_partitions(cfg, instance)
    for source in ("nq", "wf"):
        assert materialize(
            [raw_queries, query_set], partition_key=source, instance=instance, resources={"fi": fi}
        ).success
    result = materialize(
        [silver_genericizer_examples, genericizer_model, matching_embedding], instance=instance, resources={"fi": fi}
    )
    assert result.success
    checks = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert all(passed for (_, name), passed in checks.items() if name != "yield"), checks

    silver = result.asset_materializations_for_node("silver_genericizer_examples")[0].metadata
    assert silver["seeds"].value == len(distill.load_genericizer_seeds())
    model_meta = result.asset_materializations_for_node("genericizer_model")[0].metadata
    assert model_meta["loss_curve"].value.startswith("![loss curve](data:image/svg+xml;base64,")
    embed_meta = result.asset_materializations_for_node("matching_embedding")[0].metadata
    before, after = embed_meta["heldout_recall_before"].value, embed_meta["heldout_recall_after"].value
    assert 0 < before["global"]["recall@10"] <= 1 and 0 < after["global"]["recall@10"] <= 1
    calibrated = embed_meta["calibrated_threshold"].value["after"]["proposed_threshold"]

    # The distilled profile picks up what was trained (the instantiator is not trained in this test).
    distilled = load_config(project, overrides | {"model_profile": "distilled"})
    assert Path(distilled.models["genericize"].model, "config.json").exists()
    assert Path(distilled.embedder, "config.json").exists()
    assert distilled.matching_threshold() == calibrated  # `calibrated`: what the asset measured for it
    student = TransformersBackend(distilled.models["genericize"].model, CACHE, batch_size=1)
    req = genericize.build_request("who wrote hamlet", "s", 24, 0.0, distilled.models["genericize"].prompt_format)
    assert student.generate([req])[0].error is None


def test_eval_students_reports_shares_on_heldout_inputs(tmp_path: Path):
    from fineinstructions_core.student_eval import compare_students

    cfg = load_config(ROOT / "fineinstructions.yaml", {"data_dir": str(tmp_path / "data")})
    report = compare_students(cfg, cfg, queries_per_source=1, paragraphs=1)
    for side in ("baseline", "student"):
        g, i = report[side]["genericizer"], report[side]["instantiator"]
        assert g["queries"] == 5 and set(g["valid_share_by_source"]) == {
            "nq_open",
            "wellformedness",
            "cqadupstack",
            "webquestions",
            "arena_hard",
        }
        assert 0.0 <= g["valid_share"] <= 1.0
        assert i["pairs"] == 1 and sum(i["status_counts"].values()) == 1
        assert 0.0 <= i["excerpt_rule_and_judge_share"] <= i["excerpt_rule_share"] <= 1.0
    assert report["baseline"] == report["student"]  # the same profile on both sides: the same answers


def test_labelled_pairs_have_hard_negatives_from_the_same_article():
    data = subset_by_titles(
        load_labelled_set(
            ROOT / "sample_data/eval/squad_v2_half_questions.jsonl",
            ROOT / "sample_data/documents/squad_v2_half_paragraphs.jsonl",
        ),
        ["Prime number", "Rhine"],
    )
    pairs = labelled_pairs(data, Embedder(), max_pairs=40, seed=0)
    assert len(pairs) == 40
    text_pid = dict(zip(data.texts, data.pids, strict=True))
    question_pid = dict(zip(data.questions, data.question_pids, strict=True))
    positives = [(q, d) for q, d, y in pairs if y == 1.0]
    negatives = [(q, d) for q, d, y in pairs if y == 0.0]
    assert len(positives) == len(negatives)
    assert all(question_pid[q] == text_pid[d] for q, d in positives)
    assert all(question_pid[q] != text_pid[d] for q, d in negatives)
    # hard negatives: mostly other paragraphs of the question's own article
    title = dict(zip(data.pids, data.titles, strict=True))
    same_article = sum(title[question_pid[q]] == title[text_pid[d]] for q, d in negatives)
    assert same_article > len(negatives) / 2


def test_teacher_judgment_refuses_bad_settings_before_any_request(tmp_path: Path):
    project = make_tiny_project(tmp_path, queries=2, docs=1)
    # Overlapping cut-offs are refused when the config loads, before anything runs.
    with pytest.raises(ValueError, match="must be below compatible_min_score"):
        load_config(
            project,
            {
                "distillation": {
                    "embedding": {"teacher_judgment": {"incompatible_max_score": 4, "compatible_min_score": 4}}
                }
            },
        )
    # The active profile's embedder is the one being trained: its matches would label themselves.
    loop = load_config(project, {"model_profile": "distilled"})
    with pytest.raises(ValueError, match="is the one this asset trains"):
        teacher_judged_pairs(loop, [], print)
    assert compatibility.label(3) is None and compatibility.label(5) == 1.0 and compatibility.label(1) == 0.0
