"""End to end through the real services: `dagster-webserver` + `dagster-daemon`, launched over GraphQL.

The in-process tests never exercise what a user actually runs: the workspace.yaml code location, the
QueuedRunCoordinator (a queued run only starts if the daemon dequeues it), the `fi` resource reading
FI_CONFIG inside the run worker, and the run launcher's subprocess. This test launches one query-source
partition (`raw_queries` + `query_set`, no LLM) the way the UI would, and checks the lake file it writes.
It also makes a run the way `fineinstructions run` does and re-executes it through GraphQL as the UI's
"Re-execute" button does: a CLI run is a run of a defined job, not an ephemeral one the UI cannot rerun.
Then Debian's chromium, headless, opens the UI as a person would: the asset graph, an asset page with
its partitioned checks and metadata, and a click that launches one partition's materialization.
Screenshots are kept in test-artifacts/ui/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import requests
from conftest import ROOT, make_tiny_project
from dagster import DagsterInstance, DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient
from services import BIN, LOCATION, REEXECUTE, free_port, graphql, location_loaded, service, tail, wait_for

from fineinstructions_assets.definitions import job_for
from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.runs import cli_run_config, execute_defined_job, process_tags
from fineinstructions_core.config import load_config

PARTITION = "nq"
ASSETS = ["raw_queries", "query_set"]
STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 240.0
CHROMIUM = shutil.which("chromium")
SCREENSHOTS = ROOT / "test-artifacts" / "ui"

# Raised inside gql by DagsterGraphQLClient itself; nothing this test can change.
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning")]

ASSET_NODES_QUERY = "query { assetNodes { assetKey { path } groupName } }"

RUN_QUERY = """
query($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { pipelineName status repositoryOrigin { repositoryName repositoryLocationName } }
  }
}
"""


@dataclass
class Stack:
    url: str
    port: int
    config_path: Path
    daemon: subprocess.Popen[bytes]
    logs: Callable[[], str]
    cli_run_id: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A tiny project's instance with one partition run as the CLI makes it, and its webserver and daemon."""
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as env_patch:
        env_patch.setenv("DAGSTER_HOME", str(home))
        for k in ("FI_DATA_DIR", "FI_SCALE"):  # both would move or resize the project under test
            env_patch.delenv(k, raising=False)
        yield from _start(root)


def _start(root: Path) -> Iterator[Stack]:
    config_path = make_tiny_project(root / "project")
    cfg = load_config(config_path)
    with DagsterInstance.get() as instance:  # registered up front: the partition sensor has nothing to launch
        register_partitions(cfg, instance)
        assert PARTITION in instance.get_dynamic_partitions("query_sources")
        # A run as `fineinstructions run` makes it (in this process, with the CLI's run config).
        run_config = cli_run_config(config_path)
        cli_run = execute_defined_job(instance, job_for(ASSETS), ASSETS, PARTITION, run_config, process_tags())
        assert cli_run.success

    # Automation off: the runs this module launches would otherwise start LLM stages behind them.
    env = {**os.environ, "FI_CONFIG": str(config_path), "HF_HUB_OFFLINE": "1", "FI_AUTOMATION": "off"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web_log, daemon_log = root / "webserver.log", root / "daemon.log"

    def logs() -> str:
        return "\n".join(tail(p) for p in (web_log, daemon_log))

    with ExitStack() as services:
        web_args = ["-w", "workspace.yaml", "--host", "127.0.0.1", "--port", str(port)]
        web = services.enter_context(service([str(BIN / "dagster-webserver"), *web_args], env, web_log))
        daemon = services.enter_context(
            service([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env, daemon_log)
        )
        wait_for(
            "the webserver and its code location",
            lambda: location_loaded(url, [web, daemon], logs),
            STARTUP_TIMEOUT_S,
            logs,
        )
        yield Stack(url, port, config_path, daemon, logs, cli_run.run_id)


def _wait_for_run(stack: Stack, run_id: str, client: DagsterGraphQLClient) -> None:
    status: list[DagsterRunStatus] = []

    def finished() -> bool:
        status.append(client.get_run_status(run_id))
        if status[-1] in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            pytest.fail(f"run {run_id} ended {status[-1].value}\n{stack.logs()}")
        if stack.daemon.poll() is not None:
            pytest.fail(f"dagster-daemon exited with code {stack.daemon.returncode}\n{stack.logs()}")
        return status[-1] == DagsterRunStatus.SUCCESS

    wait_for(
        f"run {run_id} to succeed",
        finished,
        RUN_TIMEOUT_S,
        lambda: f"last status: {status[-1].value if status else None}\n{stack.logs()}",
    )


def test_partition_run_through_webserver_and_daemon(stack: Stack) -> None:
    url = stack.url
    # The UI's asset graph holds the training assets, in their group, beside the pipeline's.
    nodes = requests.post(f"{url}/graphql", json={"query": ASSET_NODES_QUERY}, timeout=30).json()
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes["data"]["assetNodes"]}
    for name in ("training_corpus", "trained_model", "baseline_model", "model_comparison"):
        assert groups.get(name) == "training", (name, groups)

    client = DagsterGraphQLClient("127.0.0.1", port_number=stack.port, timeout=60)
    out = stack.config_path.parent / "data" / "lake" / "query_set" / f"{PARTITION}.parquet"
    out.unlink()  # the CLI-style run wrote it: the UI-launched run must write it again
    run_id = client.submit_job_execution(
        "__ASSET_JOB",
        repository_location_name=LOCATION,
        repository_name="__repository__",
        tags={"dagster/partition": PARTITION},
        asset_selection=ASSETS,
    )
    _wait_for_run(stack, run_id, client)
    assert out.exists(), f"the run launched as the UI does wrote no {out}"
    assert len(pd.read_parquet(out)) > 0, f"{out} has no rows"

    # The CLI's run, seen by the UI: its job and code location, and re-executable from there.
    seen = graphql(url, RUN_QUERY, runId=stack.cli_run_id)["runOrError"]
    assert seen["pipelineName"] == "query_source_job", seen
    assert seen["repositoryOrigin"] == {
        "repositoryName": "__repository__",
        "repositoryLocationName": LOCATION,
    }, seen
    launched = graphql(url, REEXECUTE, parentRunId=stack.cli_run_id, strategy="ALL_STEPS")["launchRunReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    rerun_id = launched["run"]["runId"]
    _wait_for_run(stack, rerun_id, client)
    with DagsterInstance.get() as instance:
        rerun = instance.get_run_by_id(rerun_id)
        assert rerun is not None and rerun.parent_run_id == stack.cli_run_id
        assert rerun.job_name == "query_source_job" and rerun.tags["dagster/partition"] == PARTITION


def test_the_ui_in_a_real_browser(stack: Stack) -> None:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with DagsterInstance.get() as instance:
        before = {r.run_id for r in instance.get_runs()}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            expect = sync_api.expect

            def open_page(path: str, shot: str) -> None:
                page.goto(stack.url + path)
                skip = page.get_by_role("button", name="Skip")  # the UI's one-time newsletter prompt
                try:
                    skip.click(timeout=8000)
                except sync_api.TimeoutError:
                    pass
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(SCREENSHOTS / shot))

            # The asset graph: every group of the pipeline.
            open_page("/asset-groups", "asset_graph.png")
            for group in ("queries", "corpus", "matching", "generation", "training"):
                expect(page.get_by_role("button", name=group).first).to_be_visible()
            # An asset page: its automation condition, its partitioned checks with their partition.
            open_page("/assets/query_set?view=checks", "query_set_checks.png")
            for check in ("accounting", "ids_unique_not_null", "schema", "yield"):
                expect(page.get_by_text(check, exact=True).first).to_be_visible()
            expect(page.get_by_text(PARTITION, exact=True).first).to_be_visible()
            open_page("/assets/query_set", "query_set.png")
            expect(page.get_by_text("an input changed").first).to_be_visible()  # its automation condition
            open_page("/assets/raw_queries", "raw_queries.png")
            expect(page.get_by_text("an input changed").first).to_be_hidden()  # a root: the sensor starts it
            # dagster/row_count and dagster/column_schema, shown as the UI's own row count and columns.
            expect(page.get_by_text("Row count", exact=True)).to_be_visible()
            expect(page.get_by_text("required by the stage's output contract").first).to_be_visible()
            # One partition's materialization, launched by clicking.
            page.get_by_role("button", name="Materialize…").click()
            page.get_by_text("Select a partition or create one").click()
            page.get_by_placeholder("Filter partitions").fill("wf")
            page.get_by_role("menuitem").filter(has_text="wf").last.click()
            page.keyboard.press("Escape")  # closes the picker; a click outside it would be spent on closing it
            expect(page.get_by_role("menuitem").filter(has_text="wf")).to_be_hidden()
            expect(page.get_by_text("1 partition", exact=True)).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "launch_dialog.png"))
            page.get_by_role("button", name="Launch 1 run").click()
            expect(page.get_by_text("Launch runs to materialize raw_queries")).to_be_hidden(timeout=30000)
        finally:
            browser.close()

    with DagsterInstance.get() as instance:

        def launched() -> list[str]:
            return [r.run_id for r in instance.get_runs() if r.run_id not in before]

        wait_for("the clicked run to be created", lambda: bool(launched()), 60.0, stack.logs)
        (run_id,) = launched()  # automation is off here: only the click launches
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.tags.get("dagster/partition") == "wf", run and run.tags
    client = DagsterGraphQLClient("127.0.0.1", port_number=stack.port, timeout=60)
    _wait_for_run(stack, run_id, client)
    out = stack.config_path.parent / "data" / "lake" / "raw_queries" / "wf.parquet"
    assert out.exists() and len(pd.read_parquet(out)) > 0
