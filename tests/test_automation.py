"""Declarative automation under a real `dagster-daemon`: a query source added to the config is registered
by the partition sensor, and what depends on it (the template index, every shard's matches, pairs and
judgements, the training corpus) follows without a click; the training assets stay put while their
opt-in automation is off, and nothing runs when nothing changed.

The project is first materialized in this process exactly as `fineinstructions run` does it (runs of the
defined jobs), the training models left out; then the daemon takes over.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_project, write_config
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRunStatus, RunsFilter
from services import BIN, service, tail, wait_for

from fineinstructions_assets.definitions import job_for
from fineinstructions_assets.partitions import active_partitions, register_partitions
from fineinstructions_assets.runs import UNFINISHED, cli_run_config, execute_defined_job, process_tags
from fineinstructions_core.config import load_config
from fineinstructions_core.plan import runs_to_do
from fineinstructions_core.registry import REGISTRY

pytestmark = pytest.mark.e2e

INTERVAL_S = 3  # the sensors' interval for this test's code location (30 s by default)
FLOW_TIMEOUT_S = 600.0
SHARD_CHAIN = ("template_matches", "instruction_pairs", "judged_corpus")
OPT_IN = [s.name for s in REGISTRY if s.opt_in_automation]


def _materialized_since(instance: DagsterInstance, asset: str, since: float) -> list[str | None]:
    """The partitions materialized since then, once per materialization (so a repeated run shows)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), after_timestamp=since), limit=1000
    ).records
    return sorted((r.partition_key for r in records), key=str)


def _latest(instance: DagsterInstance, asset: str) -> float:
    records = instance.fetch_materializations(AssetKey(asset), limit=1).records
    return records[0].timestamp if records else 0.0


def _ticks(instance: DagsterInstance, sensor: str) -> int:
    states = [s for s in instance.all_instigator_state() if s.name == sensor]
    return sum(len(instance.get_ticks(s.instigator_origin_id, s.selector_id)) for s in states)


def test_a_new_query_source_flows_to_the_training_corpus_under_the_daemon(
    tmp_path: Path, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FI_DATA_DIR", raising=False)
    monkeypatch.delenv("FI_SCALE", raising=False)
    config_path = make_tiny_project(tmp_path / "project", queries=3, docs=2)
    full = yaml.safe_load(config_path.read_text())
    full["corpora"] = [c for c in full["corpora"] if c["name"] == "debian"]  # one shard of two documents
    first = dict(full, query_sources=[s for s in full["query_sources"] if s["name"] == "nq"])
    write_config(config_path, first)

    run_config = cli_run_config(config_path)
    with DagsterInstance.get() as instance:
        cfg = load_config(config_path)
        register_partitions(cfg, instance)
        sources, shards = active_partitions(cfg, instance)
        for stages, partition in runs_to_do(cfg, sources, shards):
            stages = [s for s in stages if s not in OPT_IN]
            if stages:
                result = execute_defined_job(instance, job_for(stages), stages, partition, run_config, process_tags())
                assert result.success, (stages, partition)
        runs_before = len(instance.get_runs())

    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "FI_CONFIG": str(config_path),
        "FI_SENSOR_INTERVAL_S": str(INTERVAL_S),
        "HF_HUB_OFFLINE": "1",
    }
    daemon_log = tmp_path / "daemon.log"
    with service([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env, daemon_log) as daemon:
        with DagsterInstance.get() as instance:

            def alive_ticks(n: int) -> bool:
                if daemon.poll() is not None:
                    pytest.fail(f"dagster-daemon exited with code {daemon.returncode}\n{tail(daemon_log)}")
                return _ticks(instance, "pipeline_automation_sensor") >= n

            # Nothing changed: the sensors tick and launch nothing.
            wait_for("two automation ticks", lambda: alive_ticks(2), 180.0, lambda: tail(daemon_log))
            assert len(instance.get_runs()) == runs_before, [r.job_name for r in instance.get_runs()]

            # A new query source in the config; nothing is launched by hand from here on.
            changed = time.time()
            write_config(config_path, full)

            def settled() -> bool:
                failed = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
                if failed:
                    pytest.fail(f"run {failed[0].run_id} of {failed[0].job_name} failed\n{tail(daemon_log)}")
                if daemon.poll() is not None:
                    pytest.fail(f"dagster-daemon exited with code {daemon.returncode}\n{tail(daemon_log)}")
                if instance.get_runs(RunsFilter(statuses=UNFINISHED)):
                    return False
                judged = _latest(instance, "judged_corpus")
                return (
                    set(_materialized_since(instance, "judged_corpus", changed)) == set(shards)
                    and _latest(instance, "training_corpus") > judged
                )

            wait_for("the new source to reach the training corpus", settled, FLOW_TIMEOUT_S, lambda: tail(daemon_log))

            assert "wf" in instance.get_dynamic_partitions("query_sources")
            # Each exactly once: nothing is launched twice by the two sensors or by successive ticks.
            assert _materialized_since(instance, "template_bank", changed) == ["wf"]
            assert _materialized_since(instance, "template_index", changed) == [None]
            for stage in SHARD_CHAIN:  # a changed template index reaches every shard
                assert _materialized_since(instance, stage, changed) == sorted(shards), stage
            assert _materialized_since(instance, "training_corpus", changed) == [None]
            for stage in OPT_IN:  # the training models' automation is opt-in, and off
                assert not _materialized_since(instance, stage, 0.0), stage
            new_runs = instance.get_runs()[: len(instance.get_runs()) - runs_before]
            launched_by = {r.tags.get("dagster/sensor_name") for r in new_runs}
            assert launched_by == {"partition_registration_sensor", "pipeline_automation_sensor"}, launched_by

            # Settled: more ticks, no more runs.
            count, ticks = len(instance.get_runs()), _ticks(instance, "pipeline_automation_sensor")
            wait_for("two more automation ticks", lambda: alive_ticks(ticks + 2), 180.0, lambda: tail(daemon_log))
            assert len(instance.get_runs()) == count
