"""Model profiles: the `paper` profile's prompt formats, parsing the released models' JSON answers, and
the clear error when a hub model is not available offline."""

from pathlib import Path

import pytest

from fineinstructions_core import genericize, instantiate, judge
from fineinstructions_core.config import ConfigError, load_config
from fineinstructions_core.llm.backends import make_backend
from fineinstructions_core.llm.models import ModelNotAvailable, resolve_local_or_hub
from fineinstructions_core.plan import signature


def test_paper_profile_selects_released_models_and_their_formats(tiny_project: Path):
    cfg = load_config(tiny_project, {"model_profile": "paper"})
    g, i, j = (cfg.models[s] for s in ("genericize", "instantiate", "judge"))
    assert (g.model, g.backend, g.prompt_format) == ("fineinstructions/query_templatizer", "vllm", "fineinstructions")
    assert (i.model, i.prompt_format, i.constrained) == (
        "fineinstructions/template_instantiator",
        "fineinstructions",
        False,
    )
    assert (j.model, j.prompt_format, j.constrained) == ("flowaicom/Flow-Judge-v0.1", "flow_judge", False)
    assert cfg.embedder == "fineinstructions/instruction_template_retrieval_embedding"
    assert cfg.section("profile.matching_threshold") == 0.865
    embedded = load_config(tiny_project)
    assert embedded.models["genericize"].prompt_format == "fewshot" and embedded.models["judge"].constrained is None
    with pytest.raises(ConfigError, match="prompt_format 'chatml' is not one of"):
        load_config(
            tiny_project, {"model_profiles": {"embedded": {"judge": {"model": "x", "prompt_format": "chatml"}}}}
        )


def test_switching_profile_makes_model_stages_stale(tiny_project: Path):
    a = load_config(tiny_project)
    b = load_config(tiny_project, {"model_profile": "paper"})
    for asset in ("template_bank", "template_matches"):
        key = "nq" if asset == "template_bank" else "debian-00000"
        assert signature(a, asset, key, [], []) != signature(b, asset, key, [], [])
    assert signature(a, "query_set", "nq", [], []) == signature(b, "query_set", "nq", [], [])
    # The distillation loop follows the teacher profile, not the active one: running the pipeline with
    # the students it trained leaves them fresh; a new teacher makes the silver examples stale.
    distillation = ("silver_genericizer_examples", "silver_instantiation_examples", "matching_embedding")
    for asset in distillation + ("genericizer_model", "instantiator_model"):
        assert signature(a, asset, "all", ["nq"], ["debian-00000"]) == signature(
            b, asset, "all", ["nq"], ["debian-00000"]
        )
    teacher = load_config(tiny_project, {"distillation": {"teacher_profile": "paper"}})
    # the teacher's own model settings count too (here the default teacher, `embedded`, gets new ones)
    retuned = load_config(
        tiny_project,
        {"model_profiles": {"embedded": {"genericize": {"max_new_tokens": 7}, "instantiate": {"max_new_tokens": 7}}}},
    )
    for asset in distillation[:2]:
        for other in (teacher, retuned):
            assert signature(a, asset, "all", ["nq"], ["debian-00000"]) != signature(
                other, asset, "all", ["nq"], ["debian-00000"]
            )
    # teacher-judgment settings count only when they are the labels in use
    judged = {"teacher_judgment": {"matches": 3}}
    assert signature(a, "matching_embedding", "all", [], []) == signature(
        load_config(tiny_project, {"distillation": {"embedding": judged}}), "matching_embedding", "all", [], []
    )
    assert signature(
        load_config(tiny_project, {"distillation": {"embedding": {"labels": "teacher_judgment"}}}),
        "matching_embedding",
        "all",
        [],
        [],
    ) != signature(
        load_config(tiny_project, {"distillation": {"embedding": judged | {"labels": "teacher_judgment"}}}),
        "matching_embedding",
        "all",
        [],
        [],
    )


def test_released_genericizer_format_and_json_answers():
    req = genericize.build_request("how do i boil an egg", "m", 256, 0.0, "fineinstructions")
    assert [(m.role, m.content) for m in req.messages] == [("user", "how do i boil an egg")]
    assert req.stop == () and req.constraint is None
    answer = '{"template": "how do i <fi>cooking task</fi>", "compatible_document_description": "A recipe."}'
    assert genericize.parse_output(answer) == ("how do i <fi>cooking task</fi>", "A recipe.")
    assert genericize.parse_output("```json\n" + answer + "\n```\nextra") == (
        "how do i <fi>cooking task</fi>",
        "A recipe.",
    )
    assert genericize.parse_output('{"template": ') is None
    with pytest.raises(ValueError, match="unknown genericize prompt format"):
        genericize.build_request("q", "m", 8, 0.0, "chatml")


def test_released_instantiator_format_and_json_answers():
    req = instantiate.build_request("what is <fi>x</fi>", "Doc text.", "m", 512, 0.0, False, "fineinstructions")
    [msg] = req.messages
    assert msg.role == "user"
    assert msg.content == "<<<Instruction Template:\nwhat is <fi>x</fi>\n>>>\n\n<<<Compatible Document:\nDoc text.\n>>>"
    steered = instantiate.build_request("t <fi>x</fi>", "d", "m", 8, 0.0, True, "fineinstructions")
    assert steered.constraint == ("excerpt_copy", "d", "t <fi>x</fi>") and steered.assistant_prefix == "Instruction:"
    parsed = instantiate.parse_output(
        '{"instruction": "what is tar?", "answer": "<excerpt>tar is<...>tool.</excerpt>"}'
    )
    assert parsed == instantiate.Parsed("what is tar?", "<excerpt>tar is<...>tool.</excerpt>")
    assert instantiate.parse_output("null") is None
    assert instantiate.parse_output('{"instruction": null, "answer": null}') is None
    assert instantiate.parse_output('{"instruction": "q", "answer": 3}') == "unparseable"
    assert instantiate.parse_output("[1, 2]") == "unparseable"
    # The judge keeps Flow Judge's format under every profile.
    jreq = judge.build_request("q", "a", "m", 64, False, "flow_judge")
    assert jreq.messages[0].content.startswith("# GOAL") and jreq.constraint is None


def test_hub_model_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match=r"fineinstructions/query_templatizer.*hf download"):
        resolve_local_or_hub("fineinstructions/query_templatizer")
    cfg = load_config(overrides={"model_profile": "paper"})
    with pytest.raises(ModelNotAvailable, match="Flow-Judge-v0.1"):
        make_backend(cfg.models["judge"], tmp_path)


def test_calibrated_threshold_needs_the_file_the_embedding_asset_writes(tiny_project: Path, tmp_path: Path):
    embedder = tmp_path / "tuned"
    embedder.mkdir()
    cfg = load_config(
        tiny_project,
        {"model_profiles": {"embedded": {"embedder": str(embedder), "matching_threshold": "calibrated"}}},
    )
    with pytest.raises(ConfigError, match="matching_threshold: calibrated needs .*matching_threshold.json"):
        cfg.matching_threshold()
    before = signature(cfg, "template_matches", "debian-00000", [], [])
    (embedder / "matching_threshold.json").write_text('{"threshold": 0.31}')
    assert cfg.matching_threshold() == 0.31
    assert signature(cfg, "template_matches", "debian-00000", [], []) != before  # a new threshold: rematch
    assert load_config(tiny_project).matching_threshold() == 0.0  # the tiny config's own number
    with pytest.raises(ConfigError, match="must be a number or 'calibrated'"):
        load_config(tiny_project, {"model_profiles": {"embedded": {"matching_threshold": "calibrate"}}})
    hub = load_config(tiny_project, {"model_profiles": {"embedded": {"matching_threshold": "calibrated"}}})
    with pytest.raises(ConfigError, match="needs the embedder to be a local model directory"):
        hub.matching_threshold()


def test_a_model_retrained_in_place_makes_its_stages_stale(tiny_project: Path, tmp_path: Path):
    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"weights, first training")
    cfg = load_config(
        tiny_project,
        {"model_profiles": {"embedded": {"embedder": str(student), "judge": {"model": str(student)}}}},
    )
    before = {a: signature(cfg, a, "debian-00000", [], []) for a in ("document_index", "judged_corpus")}
    before["query_set"] = signature(cfg, "query_set", "nq", [], [])
    (student / "model.safetensors").write_bytes(b"weights, second training")
    assert signature(cfg, "document_index", "debian-00000", [], []) != before["document_index"]
    assert signature(cfg, "judged_corpus", "debian-00000", [], []) != before["judged_corpus"]
    assert signature(cfg, "query_set", "nq", [], []) == before["query_set"]


def test_gates_and_the_labelled_set_make_only_the_judged_corpus_stale(tiny_project: Path):
    """A gate's setting, a profile's own decision or an edit of the labelled set reruns judged_corpus
    (and what it feeds), never the stages that made the pairs."""
    labels = tiny_project.parent / "labels.jsonl"
    labels.write_text('{"id": "a"}\n', encoding="utf-8")
    base = load_config(tiny_project, {"judge": {"labelled_set": "labels.jsonl"}})
    sig = {a: signature(base, a, "debian-00000", [], []) for a in ("instruction_pairs", "judged_corpus")}
    for override in (
        {"gates": {"max_leaked_share": 0.3}},
        {"model_profiles": {"embedded": {"min_score": 3}}},
        {"model_profiles": {"embedded": {"gates": {"request": False}}}},
    ):
        cfg = load_config(tiny_project, {"judge": {"labelled_set": "labels.jsonl"}} | override)
        assert signature(cfg, "judged_corpus", "debian-00000", [], []) != sig["judged_corpus"], override
        assert signature(cfg, "instruction_pairs", "debian-00000", [], []) == sig["instruction_pairs"]
    labels.write_text('{"id": "b"}\n', encoding="utf-8")
    assert signature(base, "judged_corpus", "debian-00000", [], []) != sig["judged_corpus"]
    # A profile's own decision replaces the sections for that profile only.
    cfg = load_config(tiny_project, {"model_profiles": {"embedded": {"min_score": 3, "gates": {"request": False}}}})
    assert cfg.min_score == 3 and cfg.gates.request is False and cfg.gates.relevance is True
    assert cfg.with_profile("paper").min_score == cfg.judge.min_score
