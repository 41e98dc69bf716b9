"""End to end through the real services: `dagster-webserver` + `dagster-daemon`, launched over GraphQL.

The in-process tests never exercise what a user actually runs: the workspace.yaml code location, the
QueuedRunCoordinator (a queued run only starts if the daemon dequeues it), the `fi` resource reading
FI_CONFIG inside the run worker, and the run launcher's subprocess. This test launches one query-source
partition (`raw_queries` + `query_set`, no LLM) the way the UI would, and checks the lake file it writes.
It also makes a run the way `fineinstructions run` does and re-executes it through GraphQL as the UI's
"Re-execute" button does: a CLI run is a run of a defined job, not an ephemeral one the UI cannot rerun.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
from conftest import make_tiny_project
from dagster import DagsterInstance, DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient
from services import BIN, free_port, service, tail, wait_for

from fineinstructions_assets.definitions import job_for
from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.runs import execute_defined_job, process_tags
from fineinstructions_core.config import load_config

LOCATION = "fineinstructions_assets.definitions"  # a python_module location is named after its module
PARTITION = "nq"
ASSETS = ["raw_queries", "query_set"]
STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 240.0

# Raised inside gql by DagsterGraphQLClient itself; nothing this test can change.
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning")]

LOCATION_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries { name loadStatus locationOrLoadError { __typename } }
    }
  }
}
"""


ASSET_NODES_QUERY = "query { assetNodes { assetKey { path } groupName } }"

RUN_QUERY = """
query($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { pipelineName status repositoryOrigin { repositoryName repositoryLocationName } }
  }
}
"""

REEXECUTE = """
mutation($parentRunId: String!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


def _graphql(url: str, query: str, **variables: Any) -> dict[str, Any]:
    body = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60).json()
    assert "errors" not in body, body
    return body["data"]


def _location_loaded(url: str, procs: list[subprocess.Popen[bytes]], logs: Callable[[], str]) -> bool:
    for p in procs:
        if p.poll() is not None:
            pytest.fail(f"{p.args[0]} exited early with code {p.returncode}\n{logs()}")
    try:
        if requests.get(f"{url}/server_info", timeout=5).status_code != 200:
            return False
        reply = requests.post(f"{url}/graphql", json={"query": LOCATION_QUERY}, timeout=10)
        body: dict[str, Any] = reply.json()
    except (requests.RequestException, ValueError):
        return False
    entries = ((body.get("data") or {}).get("workspaceOrError") or {}).get("locationEntries") or []
    for e in entries:
        if e["name"] == LOCATION and e["loadStatus"] == "LOADED":
            kind = e["locationOrLoadError"]["__typename"]
            if kind != "RepositoryLocation":
                pytest.fail(f"code location failed to load ({kind})\n{logs()}")
            return True
    return False


def test_partition_run_through_webserver_and_daemon(
    tmp_path: Path, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FI_DATA_DIR", raising=False)  # both would move or resize the project under test
    monkeypatch.delenv("FI_SCALE", raising=False)
    config_path = make_tiny_project(tmp_path / "project")
    cfg = load_config(config_path)
    with DagsterInstance.get() as instance:  # registered up front, so the sensor has nothing to launch
        register_partitions(cfg, instance)
        assert PARTITION in instance.get_dynamic_partitions("query_sources")
        # A run as `fineinstructions run` makes it (in this process, with the CLI's run config).
        run_config = {
            "resources": {"fi": {"config": {"config_path": str(config_path), "overrides": ""}}},
            "execution": {"config": {"in_process": {}}},
        }
        cli_run = execute_defined_job(instance, job_for(ASSETS), ASSETS, PARTITION, run_config, process_tags())
        assert cli_run.success

    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "FI_CONFIG": str(config_path),
        "HF_HUB_OFFLINE": "1",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web_log, daemon_log = tmp_path / "webserver.log", tmp_path / "daemon.log"

    def logs() -> str:
        return "\n".join(tail(p) for p in (web_log, daemon_log))

    with ExitStack() as stack:
        web_args = ["-w", "workspace.yaml", "--host", "127.0.0.1", "--port", str(port)]
        web = stack.enter_context(service([str(BIN / "dagster-webserver"), *web_args], env, web_log))
        daemon = stack.enter_context(
            service([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env, daemon_log)
        )
        wait_for(
            "the webserver and its code location",
            lambda: _location_loaded(url, [web, daemon], logs),
            STARTUP_TIMEOUT_S,
            logs,
        )

        # The UI's asset graph holds the training assets, in their group, beside the pipeline's.
        nodes = requests.post(f"{url}/graphql", json={"query": ASSET_NODES_QUERY}, timeout=30).json()
        groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes["data"]["assetNodes"]}
        for name in ("training_corpus", "trained_model", "baseline_model", "model_comparison"):
            assert groups.get(name) == "training", (name, groups)

        client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)
        run_id = client.submit_job_execution(
            "__ASSET_JOB",
            repository_location_name=LOCATION,
            repository_name="__repository__",
            tags={"dagster/partition": PARTITION},
            asset_selection=ASSETS,
        )

        status: list[DagsterRunStatus] = []

        def finished(rid: str) -> bool:
            status.append(client.get_run_status(rid))
            if status[-1] in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
                pytest.fail(f"run {rid} ended {status[-1].value}\n{logs()}")
            if daemon.poll() is not None:
                pytest.fail(f"dagster-daemon exited with code {daemon.returncode}\n{logs()}")
            return status[-1] == DagsterRunStatus.SUCCESS

        wait_for(
            f"run {run_id} to succeed",
            lambda: finished(run_id),
            RUN_TIMEOUT_S,
            lambda: f"last status: {status[-1].value if status else None}\n{logs()}",
        )

        # The CLI's run, seen by the UI: its job and code location, and re-executable from there.
        seen = _graphql(url, RUN_QUERY, runId=cli_run.run_id)["runOrError"]
        assert seen["pipelineName"] == "query_source_job", seen
        assert seen["repositoryOrigin"] == {
            "repositoryName": "__repository__",
            "repositoryLocationName": LOCATION,
        }, seen
        launched = _graphql(url, REEXECUTE, parentRunId=cli_run.run_id)["launchRunReexecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        rerun_id = launched["run"]["runId"]
        status.clear()
        wait_for(
            f"re-execution {rerun_id} to succeed",
            lambda: finished(rerun_id),
            RUN_TIMEOUT_S,
            lambda: f"last status: {status[-1].value if status else None}\n{logs()}",
        )
        with DagsterInstance.get() as instance:
            rerun = instance.get_run_by_id(rerun_id)
            assert rerun is not None and rerun.parent_run_id == cli_run.run_id
            assert rerun.job_name == "query_source_job" and rerun.tags["dagster/partition"] == PARTITION

    out = config_path.parent / "data" / "lake" / "query_set" / f"{PARTITION}.parquet"
    assert out.exists(), f"no lake file at {out}"
    assert len(pd.read_parquet(out)) > 0, f"{out} has no rows"
