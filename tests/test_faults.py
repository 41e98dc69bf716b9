"""The fault suite: real `fineinstructions run` processes killed with SIGKILL mid-stage and mid-write,
a reader holding the catalog, a copied data directory, two runs at once, a held pool, config and input
mistakes. Each case records what
happened in a report (`scripts/reliability_report.py` turns it into the README's table).

Marked `fault`: it runs in CI with the rest, on a tiny project with the embedded models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, accounting_balanced, cache_rows, gates_off, make_tiny_project, record

pytestmark = pytest.mark.fault


class Cli:
    """One `fineinstructions run` process, its output in a file that the test can wait on."""

    def __init__(self, project: Path, home: Path, *args: str, env: dict[str, str] | None = None):
        self.log = project.parent / f"cli-{time.monotonic_ns()}.log"
        self.out = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        full_env = os.environ | {"DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"} | (env or {})
        full_env.pop("FI_DATA_DIR", None)
        full_env.pop("FI_SCALE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fineinstructions_assets.cli", "--config", str(project), *args],
            cwd=ROOT,
            env=full_env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"process ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.text()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.text()[-3000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 1800) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.out.close()
        return rc


def _wait_for_new_answers(data: Path, before: int, cli: Cli, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while len(cache_rows(data)) <= before:
        if cli.proc.poll() is not None:
            raise AssertionError(f"the run ended before answering anything:\n{cli.text()}")
        if time.monotonic() > deadline:
            raise AssertionError("no new answer reached the request cache")
        time.sleep(0.1)


def _small_project(root: Path, docs: int = 1, rows: int | None = None, **over) -> Path:
    """`rows`: decode one (or a few) requests at a time, so a stage with several requests is still
    generating after its first answer is cached (continuous batching finishes a small batch at once)."""
    project = make_tiny_project(root, queries=3, docs=docs)
    cfg = yaml.safe_load(project.read_text())
    cfg["matching"]["max_templates"] = 2
    if rows is not None:
        for stage in ("genericize", "instantiate", "judge"):
            cfg["model_profiles"]["embedded"][stage]["batch_size"] = rows
    cfg["corpora"] = [c for c in cfg["corpora"] if c["name"] == "debian"]
    # Every pair reaches the judge, so each LLM stage has requests to be killed between.
    cfg["gates"] = gates_off()
    for key, value in over.items():
        cfg[key] = value
    project.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return project


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "dagster_home"
    h.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", h / "dagster.yaml")
    return h


def test_sigkill_during_each_llm_stage_then_rerun_loses_nothing(tmp_path: Path, home: Path):
    project = _small_project(tmp_path, docs=2, rows=1)
    data = project.parent / "data"
    for stage in ("genericize", "instantiate", "judge"):
        cli = Cli(project, home, "run")
        total = int(cli.wait_for(rf"{stage}: 0/(\d+) requests").group(1))
        assert total >= 2, f"{stage} has {total} request(s): too few to be killed between two answers"
        _wait_for_new_answers(data, len(cache_rows(data)), cli)
        cli.kill9()
        if stage != "genericize":
            # the run before this one was killed: this one said so and went on
            assert "marked 1 run(s) failed whose process is gone" in cli.text(), cli.text()
        record(
            f"SIGKILL of `fineinstructions run` while the {stage} stage generates",
            "the next run marks the dead run failed, frees its pool slot and goes on; answers already "
            "generated are reused from the request cache",
        )
    before = cache_rows(data)
    # a reader holds the catalog open (read-only, in another process) while the run adds views to it
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; db = duckdb.connect(sys.argv[1], read_only=True); print('open', flush=True); "
            "time.sleep(3600)",
            str(data / "catalog.duckdb"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
    final = Cli(project, home, "run")
    rc = final.wait()
    reader.kill()
    assert rc == 0, final.text()
    assert "marked 1 run(s) failed whose process is gone" in final.text()
    after = cache_rows(data)
    # no finished answer was generated again: every answer cached before the rerun is untouched
    assert all(after.get(k) == created for k, created in before.items())
    assert set(before) <= set(after)
    assert accounting_balanced(data)
    again = Cli(project, home, "run")
    assert again.wait() == 0
    assert "pipeline finished: 0 runs" in again.text(), again.text()  # nothing lost, nothing stale
    record(
        "a run while another process holds the DuckDB catalog open read-only",
        "the run finishes; the catalog is rebuilt into a new file and renamed over the old one",
    )
    # a copied, then moved data directory reads its own lake
    copy = project.parent / "data-copy"
    shutil.copytree(data, copy)
    data.rename(project.parent / "data-moved")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fineinstructions_assets.cli",
            "--config",
            str(project),
            "--set",
            f"data_dir={copy}",
            "stats",
            "--json",
        ],
        cwd=ROOT,
        env=os.environ | {"DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["all_balanced"], out.stderr
    from fineinstructions_core.io.catalog import connect_readonly

    with connect_readonly(copy / "catalog.duckdb") as db:
        assert db.execute("SELECT count(*) FROM judged_corpus_rejections").fetchone()[0] >= 0
    record(
        "a copied data directory, the original moved away",
        "the copy's catalog reads the copy's lake (views resolve relative to the catalog)",
    )


def test_sigkill_between_writing_and_renaming_a_lake_file(tmp_path: Path, home: Path):
    project = _small_project(tmp_path)
    data = project.parent / "data"
    cli = Cli(project, home, "run", env={"FI_FAULT_PAUSE_BEFORE_RENAME": "query_set"})
    deadline = time.monotonic() + 600
    while not list((data / "lake" / "query_set").glob("*.paused")):
        assert time.monotonic() < deadline and cli.proc.poll() is None, cli.text()
        time.sleep(0.3)
    cli.kill9()
    # the half-finished write never reached its real name
    assert not list((data / "lake" / "query_set").glob("*.parquet"))
    rerun = Cli(project, home, "run")
    assert rerun.wait() == 0, rerun.text()
    assert list((data / "lake" / "query_set").glob("*.parquet"))
    assert accounting_balanced(data)
    record(
        "SIGKILL between writing a lake file and renaming it into place",
        "no partial file under the real name (the temporary file is ignored); the rerun rebuilds the partition",
    )


def test_two_runs_at_once_on_one_data_directory(tmp_path: Path, home: Path):
    project = _small_project(tmp_path)
    data = project.parent / "data"
    a = Cli(project, home, "run")
    b = Cli(project, home, "run")
    assert a.wait() == 0, a.text()
    assert b.wait() == 0, b.text()
    assert accounting_balanced(data)
    third = Cli(project, home, "run")
    assert third.wait() == 0
    assert "pipeline finished: 0 runs" in third.text(), third.text()
    record(
        "two `fineinstructions run` at once on the same data directory",
        "both finish; LLM steps take turns through the pool of one; lake files are replaced atomically",
    )

    # one partition genuinely fails: its upstream lake file is damaged on disk, and a changed filter makes
    # both sources' query_set rerun; the other source's partitions still run, the failure is listed, exit 1
    damaged = data / "lake" / "raw_queries" / "wf.parquet"
    damaged.write_bytes(damaged.read_bytes()[:40])
    nq_before = (data / "lake" / "query_set" / "nq.parquet").stat().st_mtime_ns
    broken = Cli(project, home, "--set", "query_filters.min_chars=9", "run")
    assert broken.wait() == 1, broken.text()
    text = broken.text()
    listed = r"failures:\n.*query_set, template_bank \[wf\].*raw_queries\[wf\] is damaged: \S*wf\.parquet"
    assert re.search(listed, text), text
    assert "materializing query_set, template_bank [nq]" in text, text
    assert (data / "lake" / "query_set" / "nq.parquet").stat().st_mtime_ns > nq_before  # the healthy source ran
    record(
        "a stage fails for one partition (its upstream lake file damaged on disk)",
        "the other partitions still run (a stale stage that reads the failed one is skipped); the failures "
        "are listed with the damaged file named, exit 1",
    )
    damaged.unlink()  # what the message says to do
    healed = Cli(project, home, "--set", "query_filters.min_chars=9", "run")
    assert healed.wait() == 0, healed.text()
    assert accounting_balanced(data)


def test_a_held_pool_is_named_and_given_up_on(tmp_path: Path, home: Path):
    from dagster import DagsterInstance

    from fineinstructions_assets.runs import process_tags

    project = _small_project(tmp_path)
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
        from dagster._core.utils import make_new_run_id

        instance = DagsterInstance.get()
        # a live run (this test's own process) holds the only slot of the llm pool
        holder = DagsterRun(
            job_name="holder", run_id=make_new_run_id(), status=DagsterRunStatus.STARTED, tags=process_tags()
        )
        instance.add_run(holder)
        instance.event_log_storage.initialize_concurrency_limit_to_default("llm")
        instance.event_log_storage.claim_concurrency_slot("llm", holder.run_id, "template_bank")
        cli = Cli(project, home, "run", "--pool-timeout", "4")
        rc = cli.wait()
        assert rc == 1, cli.text()
        pattern = r"gave up after 4s waiting for concurrency pool 'llm' .*held by run " + holder.run_id[:8]
        assert re.search(pattern, cli.text()), cli.text()
        assert "skipping template_index: an input failed" in cli.text()
        assert instance.get_run_by_id(holder.run_id).status == DagsterRunStatus.STARTED  # a live run is left alone
    finally:
        os.environ.pop("DAGSTER_HOME", None)
    record(
        "a concurrency pool held by another live run",
        "the waiting run says which run holds the pool and gives up after --pool-timeout with that message; "
        "what depends on it is skipped and listed; exit 1",
    )


CONFIG_MISTAKES = [
    ({"matchng": {"k": 3}}, "matchng: unknown key (did you mean 'matching'?)", "a misspelt section (matchng)"),
    ({"judge": {"min_scor": 3}}, "judge.min_scor: unknown key (did you mean 'min_score'?)", "a misspelt key"),
    ({"matching": {"threshold": "abc"}}, "matching.threshold: expected a number, got 'abc'", "a wrong type"),
    ({"judge": {"min_score": 7}}, "judge.min_score: 7 is not valid", "an out-of-range value"),
    (
        {"query_sources": [{"name": "nq", "path": "q/nothing-*.jsonl", "format": "jsonl", "text_field": "question"}]},
        "query_sources[0].path: 'q/nothing-*.jsonl' matches no file",
        "a query source glob that matches no file",
    ),
    (
        {"judge": {"labelled_set": "labels/missing.jsonl"}},
        "judge.labelled_set: 'labels/missing.jsonl' is not a file",
        "a labelled judge set that is not there",
    ),
    (
        {"model_profiles": {"embedded": {"judge": {"model": "/nonexistent/judge-model"}}}},
        "model_profiles.embedded.judge.model: model '/nonexistent/judge-model' is not embedded",
        "a model that is not installed",
    ),
]


@pytest.mark.parametrize("override,message,fault", CONFIG_MISTAKES, ids=[c[2] for c in CONFIG_MISTAKES])
def test_config_mistakes_fail_before_anything_runs(tmp_path: Path, home: Path, override, message, fault):
    project = _small_project(tmp_path)
    cfg = yaml.safe_load(project.read_text())
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "model_profiles":
            cfg[key] = cfg[key] | value
        elif key == "model_profiles":
            cfg[key]["embedded"]["judge"] |= value["embedded"]["judge"]
        else:
            cfg[key] = value
    project.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = Cli(project, home, "run")
    assert cli.wait() == 2, cli.text()
    assert message in cli.text(), cli.text()
    assert not (project.parent / "data" / "lake").exists()  # nothing was written
    record(f"config: {fault}", f"exit 2 before any stage runs: `{message}`")
