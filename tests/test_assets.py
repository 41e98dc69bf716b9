"""Assets through `dagster.materialize`: metadata, checks, the sensor, and blocking checks that fail."""

import pandas as pd
import pytest
import yaml
from dagster import AssetCheckKey, AssetKey, DagsterInstance, build_sensor_context, materialize
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from fineinstructions_assets.assets import ALL_ASSETS, _checks, documents, query_set, raw_queries
from fineinstructions_assets.definitions import defs
from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.resources import FineInstructionsResource
from fineinstructions_assets.sensors import partition_registration_sensor
from fineinstructions_core.config import load_config
from fineinstructions_core.io.lake import Accounting, Lake
from fineinstructions_core.stage_base import StageResult


def test_graph_shape():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {
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
        "silver_genericizer_examples",
        "silver_instantiation_examples",
        "genericizer_model",
        "instantiator_model",
        "matching_embedding",
    }
    deps = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()
    }
    assert deps["template_matches"] == {"document_index", "template_index"}
    assert deps["training_corpus"] == {"judged_corpus"}
    assert deps["trained_model"] == deps["baseline_model"] == {"training_corpus"}
    assert deps["model_comparison"] == {"trained_model", "baseline_model"}
    assert deps["genericizer_model"] == {"silver_genericizer_examples"}
    assert deps["silver_instantiation_examples"] == {"template_matches", "template_index"}


def test_assets_carry_code_versions_and_tags_from_the_registry():
    from fineinstructions_core.codesig import code_signature
    from fineinstructions_core.registry import REGISTRY

    by_key = {a.key.to_user_string(): a for a in ALL_ASSETS}
    for spec in REGISTRY:
        asset = by_key[spec.name]
        # The UI's "code version changed" follows the same code signature the CLI's staleness uses.
        assert asset.code_versions_by_key[asset.key] == code_signature(spec.compute)[:16]
        tags = asset.specs_by_key[asset.key].tags
        assert tags["partitioning"] == spec.partitioning.value
        assert tags["run"] == ("default" if spec.default_run else "on_request")
    assert by_key["genericizer_model"].specs_by_key[AssetKey("genericizer_model")].tags["run"] == "on_request"


def test_asset_owners_come_from_fi_owners_and_are_checked():
    from fineinstructions_assets.assets import asset_owners

    assert asset_owners({}) == []
    assert asset_owners({"FI_OWNERS": "team:data, ana@example.org"}) == ["team:data", "ana@example.org"]
    for bad in ("data team", "team:", "ana@"):
        with pytest.raises(ValueError, match="FI_OWNERS: .* is neither an e-mail address nor team:<name>"):
            asset_owners({"FI_OWNERS": bad})


def test_materialize_query_stages_with_checks(tiny_project, dagster_home):
    instance = DagsterInstance.get()
    cfg = load_config(tiny_project)
    register_partitions(cfg, instance)
    result = materialize(
        [raw_queries, query_set],
        partition_key="nq",
        instance=instance,
        resources={"fi": FineInstructionsResource(config_path=str(tiny_project))},
    )
    assert result.success
    mats = result.asset_materializations_for_node("query_set")
    meta = mats[0].metadata
    out = Lake(cfg.lake_dir).read("query_set", "nq")
    assert meta["dagster/row_count"].value == len(out)
    schema = {c.name: c for c in meta["dagster/column_schema"].value.columns}
    assert list(schema) == list(out.columns)
    assert schema["query_id"].constraints.unique and not schema["query_id"].constraints.nullable
    assert schema["query"].description == "required by the stage's output contract"
    funnel = {r.data["step"]: r.data["rows"] for r in meta["funnel"].value.records}
    assert funnel["in"] == 6 == funnel["out"] + sum(v for k, v in funnel.items() if k.startswith("rejected: "))
    assert meta["funnel_plot"].value.startswith("![funnel](data:image/svg+xml;base64,")
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"ids_unique_not_null": True, "schema": True, "accounting": True, "yield": True}


def test_each_shard_keeps_its_own_check_status(tiny_project, dagster_home):
    """A shard whose yield check failed still reads Failed after another shard passes (the checks share
    the asset's partitions; an unpartitioned check would show only the latest shard's result)."""
    root = tiny_project.parent
    (root / "d" / "broken.jsonl").write_text('{"text": 1}\n{"id": "x"}\nnot json\n', encoding="utf-8")
    raw = yaml.safe_load(tiny_project.read_text())
    raw["corpora"].append({"name": "broken", "path": "d/broken.jsonl", "format": "jsonl", "text_field": "text"})
    tiny_project.write_text(yaml.safe_dump(raw, sort_keys=False))
    instance = DagsterInstance.get()
    register_partitions(load_config(tiny_project), instance)
    resources = {"fi": FineInstructionsResource(config_path=str(tiny_project))}
    for shard in ("broken-00000", "debian-00000"):
        assert materialize([documents], partition_key=shard, instance=instance, resources=resources).success
    storage = instance.event_log_storage
    status = {
        name: {
            info.partition_key: info.latest_execution_status
            for info in storage.get_asset_check_partition_info([AssetCheckKey(AssetKey("documents"), name)])
        }
        for name in ("yield", "accounting")
    }
    assert status["yield"] == {
        "broken-00000": AssetCheckExecutionRecordStatus.FAILED,
        "debian-00000": AssetCheckExecutionRecordStatus.SUCCEEDED,
    }
    assert set(status["accounting"].values()) == {AssetCheckExecutionRecordStatus.SUCCEEDED}
    # The latest evaluation of each partition names that partition.
    history = storage.get_asset_check_execution_history(AssetCheckKey(AssetKey("documents"), "yield"), limit=5)
    assert [r.partition for r in history] == ["debian-00000", "broken-00000"]


def test_blocking_checks_catch_bad_output():
    out = pd.DataFrame({"query_id": ["a", "a", None], "source": "s"})
    acc = Accounting("query_set", "p", "queries", rows_in=5, rows_out=3, rejected={"duplicate": 1})
    results = {c.check_name: c.passed for c in _checks("query_set", StageResult("query_set", "p", out, out, acc))}
    assert results == {"ids_unique_not_null": False, "schema": False, "accounting": False, "yield": True}


def test_sensor_registers_partitions_and_requests_runs(tiny_project, dagster_home):
    instance = DagsterInstance.get()
    ctx = build_sensor_context(
        instance=instance, definitions=defs, resources={"fi": FineInstructionsResource(config_path=str(tiny_project))}
    )
    result = partition_registration_sensor(ctx)
    keys = sorted(r.partition_key for r in result.run_requests)
    assert keys == ["books-00000", "debian-00000", "nq", "wf"]
    jobs = {r.partition_key: r.job_name for r in result.run_requests}  # runs of the defined jobs
    assert jobs == {"nq": "query_source_job", "wf": "query_source_job"} | {
        k: "corpus_shard_job" for k in ("books-00000", "debian-00000")
    }
    assert len(result.dynamic_partitions_requests) == 2


def test_all_assets_are_exported():
    assert len(ALL_ASSETS) == 18  # the thirteen pipeline assets and the five of the distillation loop
