"""The stage registry: one declaration per stage, everything else derived from it; signatures that
cover the code a stage runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from dagster import DagsterInstance, materialize

from fineinstructions_assets.definitions import build_definitions
from fineinstructions_assets.partitions import active_partitions, register_partitions
from fineinstructions_assets.resources import FineInstructionsResource
from fineinstructions_core.config import load_config
from fineinstructions_core.io.catalog import connect_readonly, refresh_catalog, stats
from fineinstructions_core.io.lake import Lake
from fineinstructions_core.plan import is_fresh, run_stage, runs_to_do, signature
from fineinstructions_core.registry import REGISTRY, Contract, Partitioning, Registry, RegistryError, StageSpec
from fineinstructions_core.stage_base import StageContext, StageResult


def document_lengths(ctx: StageContext) -> StageResult:
    """A small extra stage: characters and words per document of the shard."""
    docs = ctx.lake.read("documents", ctx.partition)
    out = pd.DataFrame(
        {
            "document_id": docs["document_id"],
            "n_chars": docs["text"].str.len(),
            "n_words": docs["text"].str.split().str.len(),
        }
    )
    return ctx.finish(out, pd.DataFrame(columns=["document_id", "reason"]), len(docs))


LENGTHS = StageSpec(
    "document_lengths",
    Partitioning.CORPUS_SHARD,
    ("documents",),
    (),
    document_lengths,
    Contract("document_id", ("document_id", "n_chars", "n_words"), "documents", 0.99),
    "corpus",
    "Characters and words per document.",
)


def test_registry_is_in_dependency_order_and_refuses_unknown_stages():
    assert len(REGISTRY) == 18
    seen: set[str] = set()
    for spec in REGISTRY:
        assert set(spec.upstream) <= seen, spec.name
        seen.add(spec.name)
    with pytest.raises(RegistryError, match="not declared before it"):
        Registry([replace(LENGTHS, upstream=("nope",))])
    with pytest.raises(RegistryError, match="declared twice"):
        REGISTRY.with_stage(replace(LENGTHS, name="documents"))
    assert REGISTRY.downstream("judged_corpus") == [
        "training_corpus",
        "trained_model",
        "baseline_model",
        "model_comparison",
    ]
    assert REGISTRY.ancestors("model_comparison")[-3:] == ["training_corpus", "trained_model", "baseline_model"]
    chains = [c for _, c in REGISTRY.run_segments()]
    assert chains == [
        ["raw_queries", "query_set", "template_bank"],
        ["template_index"],
        ["documents", "document_index", "template_matches", "instruction_pairs", "judged_corpus"],
        ["training_corpus"],
        ["trained_model"],
        ["baseline_model"],
        ["model_comparison"],
    ]
    assert len(REGISTRY.run_segments(include_on_demand=True)) == 12


def test_an_extra_stage_appears_in_graph_jobs_plan_signatures_and_catalog(tiny_project: Path, dagster_home: Path):
    registry = REGISTRY.with_stage(LENGTHS)
    defs = build_definitions(registry)
    graph = defs.resolve_asset_graph()
    key = next(k for k in graph.get_all_asset_keys() if k.to_user_string() == "document_lengths")
    assert {p.to_user_string() for p in graph.get(key).parent_keys} == {"documents"}
    assert "document_lengths" in {
        k.to_user_string() for k in defs.resolve_job_def("corpus_shard_job").asset_layer.selected_asset_keys
    }

    cfg = load_config(tiny_project)
    instance = DagsterInstance.get()
    register_partitions(cfg, instance)
    sources, shards = active_partitions(cfg, instance)
    # The CLI's plan: on a fresh project every stage has work, the new one included, once per shard.
    plan = list(runs_to_do(cfg, sources, shards, registry=registry))
    assert [(["document_lengths"], s) for s in shards] == [p for p in plan if p[0] == ["document_lengths"]]

    shard = "debian-00000"
    fi = FineInstructionsResource(config_path=str(tiny_project))
    assets = {a.key.to_user_string(): a for a in defs.assets}  # type: ignore[union-attr]
    result = materialize(
        [assets["documents"], assets["document_lengths"]], partition_key=shard, instance=instance, resources={"fi": fi}
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations() if e.asset_key == key}
    assert checks == {"ids_unique_not_null": True, "schema": True, "accounting": True, "yield": True}
    lengths = Lake(cfg.lake_dir).read("document_lengths", shard)
    assert len(lengths) == 2 and (lengths["n_chars"] > 0).all()

    sig = signature(cfg, "document_lengths", shard, sources, shards, registry)
    assert is_fresh(cfg, "document_lengths", shard, sig)
    # its upstream rewritten with other bytes: the new stage is stale, and only its own chain
    docs = Lake(cfg.lake_dir).read("documents", shard)
    Lake(cfg.lake_dir).write("documents", shard, docs.head(1))
    assert signature(cfg, "document_lengths", shard, sources, shards, registry) != sig

    refresh_catalog(cfg.catalog_path, cfg.lake_dir, registry.names())
    with connect_readonly(cfg.catalog_path) as db:
        assert db.execute("SELECT count(*) FROM document_lengths").fetchone()[0] == 2
    assert "document_lengths" in stats(Lake(cfg.lake_dir).all_accounting(), registry.names())


def test_swapping_a_stage_function_makes_that_stage_stale_and_nothing_unrelated(tiny_project: Path):
    cfg = load_config(tiny_project)
    from fineinstructions_core.shards import plan_all_shards

    shards = [s.key for s in plan_all_shards(cfg)]
    for asset, key in (("raw_queries", "nq"), ("query_set", "nq"), ("documents", "debian-00000")):
        run_stage(cfg, asset, key, ["nq"], shards)

    original = REGISTRY["query_set"].compute

    def stricter_query_set(ctx: StageContext) -> StageResult:
        result = original(ctx)
        return ctx.finish(result.output.head(1), result.rejections, len(result.output) + len(result.rejections))

    swapped = Registry(replace(s, compute=stricter_query_set) if s.name == "query_set" else s for s in REGISTRY)
    fresh = {
        (a, k): is_fresh(cfg, a, k, signature(cfg, a, k, ["nq"], shards, swapped))
        for a, k in (("raw_queries", "nq"), ("query_set", "nq"), ("documents", "debian-00000"))
    }
    assert fresh == {("raw_queries", "nq"): True, ("query_set", "nq"): False, ("documents", "debian-00000"): True}
    # The CLI's plan reruns the query chain from query_set on; the documents of the shard stay as they are.
    todo = dict((p, s) for s, p in runs_to_do(cfg, ["nq"], shards, registry=swapped))
    assert todo["nq"] == ["query_set", "template_bank"]
    assert todo["debian-00000"][0] == "document_index"


_SIGNATURES = """
import json, sys
from fineinstructions_core.config import load_config
from fineinstructions_core.plan import signature
from fineinstructions_core.registry import REGISTRY, Partitioning
from fineinstructions_core.shards import plan_all_shards
cfg = load_config(sys.argv[1])
shards = [s.key for s in plan_all_shards(cfg)]
sources = [s.name for s in cfg.query_sources]
keys = {Partitioning.QUERY_SOURCE: sources[0], Partitioning.CORPUS_SHARD: shards[0], Partitioning.NONE: "all"}
print(json.dumps({s.name: signature(cfg, s.name, keys[s.partitioning], sources, shards) for s in REGISTRY}))
"""


def _signatures(package_root: Path, project: Path) -> dict[str, str]:
    env = os.environ | {"PYTHONPATH": str(package_root)}
    out = subprocess.run(
        [sys.executable, "-c", _SIGNATURES, str(project)],
        env=env,
        cwd=package_root,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _edited_copy(tmp: Path, module: str, old: str, new: str) -> Path:
    root = tmp / f"pkg-{abs(hash((module, old, new)))}"
    shutil.copytree(
        ROOT / "fineinstructions_core", root / "fineinstructions_core", ignore=shutil.ignore_patterns("__pycache__")
    )
    path = root / "fineinstructions_core" / module
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {module}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return root


def test_a_patched_prompt_changes_the_signature_after_it_was_computed(monkeypatch):
    """Parsed sources are kept between calls, the values they read are not: a prompt edited in a running
    process (or a code location reloaded) still changes its stage's code signature."""
    from fineinstructions_core import judge
    from fineinstructions_core.codesig import code_signature

    compute = REGISTRY["judged_corpus"].compute
    before = code_signature(compute)
    assert code_signature(compute) == before
    monkeypatch.setattr(judge, "PROMPT", judge.PROMPT + " ")
    assert code_signature(compute) != before


def test_signatures_follow_the_code_each_stage_runs(tiny_project: Path, tmp_path: Path):
    """Edits in a temporary copy of the package: logic in a helper one stage calls (and one in the
    stage module itself) changes exactly that stage's signature; a docstring or comment changes none."""
    base = _signatures(_edited_copy(tmp_path, "queries.py", "", ""), tiny_project)
    # A helper of query_set, two calls away from the stage function.
    normalize = _edited_copy(tmp_path, "queries.py", "def normalize_query(", "def normalize_query(  # edited\n")
    assert _signatures(normalize, tiny_project) == base  # a comment is no change
    logic = _edited_copy(
        tmp_path,
        "queries.py",
        "def normalize_query(text: str) -> str:\n",
        'def normalize_query(text: str) -> str:\n    text = text.replace("?", " ? ")\n',
    )
    changed = _signatures(logic, tiny_project)
    assert {k for k in base if base[k] != changed[k]} == {"query_set"}
    # The case: document dedup logic in stages.py itself.
    dedup = _edited_copy(tmp_path, "stages.py", 'dup = out.duplicated("document_id")', 'dup = out.duplicated("text")')
    changed = _signatures(dedup, tiny_project)
    assert {k for k in base if base[k] != changed[k]} == {"documents"}
    # A docstring of the stage function: not a change.
    doc = _edited_copy(
        tmp_path, "stages.py", '"""One shard of a corpus;', '"""One shard of one corpus (edited docstring);'
    )
    assert _signatures(doc, tiny_project) == base
    # A prompt constant the judge reads: the judge, and the comparison that judges the models' answers.
    prompt = _edited_copy(tmp_path, "judge.py", "Strictly adhere to", "Adhere strictly to")
    changed = _signatures(prompt, tiny_project)
    assert {k for k in base if base[k] != changed[k]} == {"judged_corpus", "model_comparison"}


def test_config_sections_are_typed_and_errors_name_the_key(tiny_project: Path):
    from fineinstructions_core.config import ConfigError

    cfg = load_config(tiny_project)
    assert cfg.matching.k == 5 and cfg.judge.min_score == 4 and cfg.budget.rollover is True
    cases = {
        "matchng": ({"matchng": {"k": 3}}, "matchng: unknown key (did you mean 'matching'?)"),
        "judge.min_scor": ({"judge": {"min_scor": 3}}, "judge.min_scor: unknown key (did you mean 'min_score'?)"),
        "threshold": ({"matching": {"threshold": "abc"}}, "matching.threshold: expected a number, got 'abc'"),
        "range": ({"judge": {"min_score": 9}}, "judge.min_score: 9 is not valid"),
        "backend option": (
            {"model_profiles": {"embedded": {"judge": {"max_new_token": 3}}}},
            "model_profiles.embedded.judge.max_new_token: unknown key for the transformers backend "
            "(did you mean 'max_new_tokens'?)",
        ),
        "profile": ({"model_profile": "embeded"}, "model_profile: 'embeded' is not defined under model_profiles"),
    }
    for name, (override, message) in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(tiny_project, override)
        assert message in str(err.value), (name, str(err.value))


def test_the_old_training_section_still_loads_as_budget(tiny_project: Path, caplog: pytest.LogCaptureFixture):
    from fineinstructions_core.config import ConfigError

    text = tiny_project.read_text(encoding="utf-8").replace("\nbudget:", "\ntraining:")
    tiny_project.write_text(text, encoding="utf-8")
    with caplog.at_level("WARNING"):
        cfg = load_config(tiny_project, {"training": {"budget_ratio": 0.5}})
    assert cfg.budget.budget_ratio == 0.5
    assert "'training' is now called 'budget'" in caplog.text
    with pytest.raises(ConfigError, match="both are set"):
        load_config(tiny_project, {"budget": {"rollover": False}})


def test_one_default_per_setting():
    """The matching threshold has one default, the config's; no stage module repeats it."""
    from fineinstructions_core.config import MatchingSettings

    assert MatchingSettings().threshold == 0.25
    for path in list((ROOT / "fineinstructions_core").rglob("*.py")) + list(
        (ROOT / "fineinstructions_assets").rglob("*.py")
    ):
        text = path.read_text(encoding="utf-8")
        assert '.get("threshold"' not in text and "cfg.raw.get(" not in text, path
        assert textwrap.dedent('.get("min_score"') not in text, path


def test_a_config_may_name_a_base_and_state_only_what_it_changes(tiny_project: Path):
    from fineinstructions_core.config import ConfigError

    exp = tiny_project.parent / "experiment.yaml"
    exp.write_text("base: fineinstructions.yaml\ndata_dir: exp\npretraining: {lr: 3.0e-4}\n", encoding="utf-8")
    cfg, base = load_config(exp), load_config(tiny_project)
    assert cfg.data_dir == tiny_project.parent / "exp" and cfg.pretraining.lr == 3.0e-4
    assert cfg.pretraining.sequence_length == base.pretraining.sequence_length  # merged, not replaced
    assert [c.name for c in cfg.corpora] == [c.name for c in base.corpora]
    exp.write_text("base: experiment.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="a cycle"):
        load_config(exp)
    exp.write_text("base: missing.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not found"):
        load_config(exp)


def test_the_step_executor_comes_from_the_environment_with_clear_errors(tmp_path: Path):
    from fineinstructions_assets.definitions import executor_from_env

    assert executor_from_env({}) is None  # Dagster's default executor
    with pytest.raises(ValueError, match="FI_EXECUTOR='spark' is not one of k8s, dask"):
        executor_from_env({"FI_EXECUTOR": "spark"})
    # The settings file is checked before the integration is imported, installed or not.
    for text in ("execution: 3\n", "- a\n- list\n", "execution:\n  config: [1]\n"):
        bad = tmp_path / "run_config.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match="expected an execution.config mapping"):
            executor_from_env({"FI_EXECUTOR": "k8s", "FI_EXECUTOR_CONFIG": str(bad)})
    bad.write_text("execution: [unclosed\n")
    with pytest.raises(ValueError, match="cannot be read as YAML"):
        executor_from_env({"FI_EXECUTOR": "k8s", "FI_EXECUTOR_CONFIG": str(bad)})
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the package dagster-k8s"):
            executor_from_env({"FI_EXECUTOR": "k8s"})
    else:
        shipped = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "run_config_k8s_job_executor.yaml"
        assert executor_from_env({"FI_EXECUTOR": "k8s", "FI_EXECUTOR_CONFIG": str(shipped)}) is not None
    # The local deployment's executor (distributed is a dev dependency), configured from its shipped file.
    shipped = Path(__file__).resolve().parent.parent / "deploy" / "local" / "dask_executor.yaml"
    dask = executor_from_env({"FI_EXECUTOR": "dask", "FI_EXECUTOR_CONFIG": str(shipped)})
    assert dask is not None and dask.name == "dask"


def test_the_cli_refuses_to_run_under_another_step_executor(monkeypatch: pytest.MonkeyPatch, capsys):
    from fineinstructions_assets.cli import main

    monkeypatch.setenv("FI_EXECUTOR", "k8s")
    assert main(["run"]) == 2
    assert "FI_EXECUTOR=k8s is set: `fineinstructions run` executes runs in this process" in capsys.readouterr().err


def test_cli_runs_name_the_code_location_as_the_workspace_does():
    from fineinstructions_assets.runs import CODE_LOCATION, remote_job_origin

    def location(env: dict[str, str]) -> str:
        return remote_job_origin("corpus_shard_job", env).repository_origin.code_location_origin.location_name

    assert location({}) == CODE_LOCATION == "fineinstructions_assets.definitions"  # workspace.yaml's module
    assert location({"FI_LOCATION_NAME": "fineinstructions"}) == "fineinstructions"  # a workspace's location_name
    assert remote_job_origin("corpus_shard_job", {}).job_name == "corpus_shard_job"
