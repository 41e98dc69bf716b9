"""The distributed deployment as `deploy/local/up.sh` starts it: the Dagster instance in a throw-away
PostgreSQL cluster, steps executed by two Dask workers, the daemon and the webserver, all on loopback.

A backfill of every corpus shard is launched through GraphQL as the UI launches it. While a shard's
instruction_pairs step is generating, the Dask worker running it is killed with SIGKILL. The step runs
again on the surviving worker (or, failing that, the failed run is re-executed from its failure through
GraphQL): every shard ends materialized, the accounting balances, and no answer cached before the kill is
generated again. Each materialization names the worker that made it.

Skipped, with the reason, only where PostgreSQL's server binaries or the deploy packages are missing
(`.ci/run` installs them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, accounting_balanced, cache_rows, make_tiny_project, record
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from services import REEXECUTE, free_port, graphql, location_loaded, tail, wait_for

from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.runs import cli_run_config, execute_defined_job, process_tags
from fineinstructions_core.config import load_config
from fineinstructions_core.registry import REGISTRY, Partitioning

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

UP, DOWN = ROOT / "deploy" / "local" / "up.sh", ROOT / "deploy" / "local" / "down.sh"
SHARD_CHAIN = REGISTRY.partitioned_by(Partitioning.CORPUS_SHARD)
QUERY_CHAIN = REGISTRY.partitioned_by(Partitioning.QUERY_SOURCE)
KILLED_STEP = "instruction_pairs"
BACKFILL_TIMEOUT_S = 900.0

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""



def _missing() -> str | None:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "PostgreSQL's server binaries are not installed (apt-get install postgresql; .ci/run does)"
    try:
        import dagster_postgres  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        return f"the deploy packages are not installed (pip install -e '.[deploy]'): {exc}"
    return None


@dataclass
class Deployment:
    state: Path
    env: dict[str, str]
    project: Path
    data: Path

    def logs(self) -> str:
        return "\n".join(tail(p, 2500) for p in sorted((self.state / "logs").glob("*.log")))

    def worker_pid(self, name: str) -> int:
        return int((self.state / "pids" / f"{name}.pid").read_text())


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    project = make_tiny_project(tmp_path / "project", queries=3, docs=2)
    cfg = yaml.safe_load(project.read_text())
    cfg["matching"]["max_templates"] = 2
    # One request decoded at a time, so instruction_pairs is still generating after its first answer is cached.
    cfg["model_profiles"]["embedded"]["instantiate"]["batch_size"] = 1
    project.write_text(yaml.safe_dump(cfg, sort_keys=False))
    state = tmp_path / "deploy"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("FI_DATA_DIR", "FI_SCALE", "DAGSTER_HOME")},
        "FI_CONFIG": str(project),
        "FI_AUTOMATION": "off",  # this test launches every run itself
        "FI_WEB_PORT": str(free_port()),
        "FI_WORKERS": "2",
        "VENV": str(Path(sys.executable).parent.parent),
    }
    try:
        up = subprocess.run([str(UP), str(state)], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        exported = {}
        for line in (state / "env.sh").read_text().splitlines():
            for pair in line.removeprefix("export ").split():
                key, _, value = pair.partition("=")
                exported[key] = value
        yield Deployment(state, {**env, **exported}, project, project.parent / "data")
    finally:
        subprocess.run([str(DOWN), str(state)], env=env, capture_output=True, timeout=120)


def _worker_executing(address: str, step: str) -> tuple[str, str] | None:
    """(worker name, run id) of a Dask worker executing `step` right now (task keys: `job.run_id.step`)."""
    from distributed import Client

    def executing(dask_worker) -> tuple[str, list[str]]:  # runs on each worker
        return str(dask_worker.name), [str(ts.key) for ts in dask_worker.state.executing]

    with Client(address, timeout=30) as client:
        for name, keys in client.run(executing).values():
            for key in keys:
                if key.endswith(f".{step}"):
                    return name, key.split(".")[-2]
    return None


def _executed_by(instance: DagsterInstance, run_ids: set[str]) -> dict[tuple[str, str, str], str]:
    """(stage, shard, run) -> the worker named in the materialization, for the runs given."""
    found: dict[tuple[str, str, str], str] = {}
    for stage in SHARD_CHAIN:
        for e in instance.fetch_materializations(AssetKey(stage), limit=100).records:
            mat = e.asset_materialization
            if e.run_id in run_ids and mat is not None:
                found[(stage, str(mat.partition), e.run_id)] = str(mat.metadata["executed_by"].value)
    return found


def _by_worker(where: dict[tuple[str, str, str], str]) -> str:
    names: dict[str, list[str]] = {}
    for (stage, shard, _), w in sorted(where.items()):
        names.setdefault(w.split(" on ")[0], []).append(f"{stage}[{shard}]")
    return "; ".join(f"{w}: {', '.join(steps)}" for w, steps in sorted(names.items()))


def test_a_backfill_of_every_shard_on_two_dask_workers_survives_a_killed_worker(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
):
    d = deployment
    for key in ("DAGSTER_HOME", "FI_PG_PORT"):  # this process talks to the deployment's instance
        monkeypatch.setenv(key, d.env[key])
    cfg = load_config(d.project)
    url, scheduler = d.env["FI_WEB_URL"], d.env["FI_DASK_SCHEDULER"]
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        register_partitions(cfg, instance)
        shards = instance.get_dynamic_partitions("corpus_shards")
        assert len(shards) >= 2, shards
        # What the shards read: the template index over both query sources, made here in-process.
        run_config = cli_run_config(d.project)
        for source in instance.get_dynamic_partitions("query_sources"):
            ran = execute_defined_job(instance, "query_source_job", QUERY_CHAIN, source, run_config, process_tags())
            assert ran.success
        assert execute_defined_job(
            instance, "index_and_training_job", ["template_index"], None, run_config, process_tags()
        ).success
        wait_for("the webserver's code location", lambda: location_loaded(url, [], d.logs), 240, d.logs)

        before_backfill = cache_rows(d.data)
        launched = graphql(
            url,
            LAUNCH_BACKFILL,
            params={"assetSelection": [{"path": [s]} for s in SHARD_CHAIN], "partitionNames": shards},
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]

        # Kill the worker generating instruction pairs once it has cached an answer of its own.
        executing, deadline = None, time.monotonic() + BACKFILL_TIMEOUT_S
        while executing is None:
            assert time.monotonic() < deadline, f"no {KILLED_STEP} step was seen generating\n{d.logs()}"
            if len(cache_rows(d.data)) > len(before_backfill):
                executing = _worker_executing(scheduler, KILLED_STEP)
            time.sleep(0.5)
        killed, killed_run = executing
        killed_shard = instance.get_run_by_id(killed_run).tags["dagster/partition"]  # type: ignore[union-attr]
        cached_at_kill = cache_rows(d.data)
        os.killpg(d.worker_pid(killed), signal.SIGKILL)  # the worker and its nanny: the whole worker is gone
        survivor = next(f"worker-{i}" for i in (1, 2) if f"worker-{i}" != killed)

        def backfill_ended() -> bool:
            backfill = instance.get_backfill(backfill_id)
            assert backfill is not None
            return backfill.status.value not in ("REQUESTED", "CANCELING", "FAILING")

        wait_for(f"backfill {backfill_id}", backfill_ended, BACKFILL_TIMEOUT_S, d.logs)
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert len(runs) == len(shards), [(r.run_id, r.tags.get("dagster/partition")) for r in runs]
        failed = [r for r in runs if r.status != DagsterRunStatus.SUCCESS]
        # The rerun of a run the kill failed: from its failure, through GraphQL as the UI's button does.
        reruns = []
        for run in failed:
            again = graphql(url, REEXECUTE, parentRunId=run.run_id, strategy="FROM_FAILURE")["launchRunReexecution"]
            assert again["__typename"] == "LaunchRunSuccess", again
            reruns.append(again["run"]["runId"])
        for run_id in reruns:
            wait_for(
                f"re-execution {run_id}",
                lambda rid=run_id: instance.get_run_by_id(rid).status  # type: ignore[union-attr]
                in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED),
                BACKFILL_TIMEOUT_S,
                d.logs,
            )
            assert instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS, d.logs()  # type: ignore[union-attr]

        # Every shard's whole chain is materialized, and the stage accounting balances.
        for stage in SHARD_CHAIN:
            assert set(shards) <= instance.get_materialized_partitions(AssetKey(stage)), stage
        assert accounting_balanced(d.data)
        # No answer cached before the kill was generated again (its row would have a new `created`).
        after = cache_rows(d.data)
        assert {k: after.get(k) for k in cached_at_kill} == cached_at_kill

        # Steps ran on both workers, and the killed step and what follows it ran again on the survivor.
        where = _executed_by(instance, {r.run_id for r in runs} | set(reruns))
        workers = {w.split()[2] for w in where.values() if w.startswith("dask worker ")}
        assert workers == {"worker-1", "worker-2"}, where
        # The killed shard's pairs (and its judgements) were made on the survivor.
        for stage in (KILLED_STEP, "judged_corpus"):
            made = [w for (st, shard, _), w in where.items() if st == stage and shard == killed_shard]
            assert made and all(f" {survivor} " in w for w in made), (stage, killed_shard, where)

    outcome = f"{len(failed)} run(s) failed and were re-executed from failure" if failed else "the step ran again"
    record(
        "a Dask worker SIGKILLed while generating instruction pairs, in a GraphQL backfill of every shard",
        f"{outcome} on the surviving worker; every shard materialized, accounting balanced, no cached "
        "answer regenerated; steps ran on both workers (each materialization names its worker)",
    )
    print(f"steps by worker: {_by_worker(where)}")
