"""The runs the CLI makes: runs of the code location's defined jobs, tagged with their process, reaped when
that process is gone, and never left waiting silently for a concurrency pool.

A run is created in the instance with the same origin a run launched from the UI has (the workspace's
code location, its repository and job), then executed in this process. So the UI lists it under its job,
shows it on the timeline and can re-execute it, with the same run config.

A run killed with SIGKILL stays STARTED in the instance and keeps the pool slots its steps claimed,
so every later run waiting on that pool would wait forever. Each run the CLI starts is tagged with the
pid, host and process start time of the process that executes it; before launching, the CLI marks the
runs whose process is gone as failed and frees their slots (the daemon's run monitoring does the same
for runs the UI launches, see dagster_home/dagster.yaml). A run that must wait for a slot held by a
live run says which run holds it, and gives up after a set time.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import AssetKey, DagsterInstance, DagsterRunStatus, JobExecutionResult, RunsFilter
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

# What workspace.yaml loads: a python_module location is named after its module.
CODE_LOCATION = "fineinstructions_assets.definitions"
DEFINITIONS_ATTRIBUTE = "defs"
REPOSITORY = "__repository__"  # the name Dagster gives the repository of a Definitions object
WORKING_DIRECTORY = str(Path(__file__).resolve().parent.parent)
PID_TAG = "fineinstructions/pid"
HOST_TAG = "fineinstructions/host"
START_TAG = "fineinstructions/process_start"
UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


class PoolTimeout(RuntimeError):
    """A concurrency pool stayed full past the wait limit; the message names who holds it."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), None when it does not exist.

    With the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces: fields after its closing parenthesis are fixed
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Tags that say which process executes a run."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), START_TAG: _process_start(pid) or ""}


def process_alive(tags: dict[str, str]) -> bool:
    """Whether the process a run's tags name still runs (runs of other hosts count as alive)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG):
        return True
    start = _process_start(int(tags[PID_TAG]))
    return start is not None and start == tags.get(START_TAG, start)


def reap_dead_runs(instance: DagsterInstance, only_pid: int | None = None) -> list[str]:
    """Mark unfinished runs whose process is gone as failed and free their pool slots.

    `only_pid` reaps this process's own runs whatever their state (on SIGTERM). Returns the run ids."""
    reaped = []
    for run in instance.get_runs(RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: socket.gethostname()})):
        if run.parent_run_id:
            # A re-execution (from the UI) copies its parent's tags, process included, but runs in a run
            # worker of its own, which Dagster watches (the code server's orphan check), not this.
            continue
        tags = dict(run.tags)
        if only_pid is not None:
            if tags.get(PID_TAG) != str(only_pid):
                continue
            reason = f"the process that ran it (pid {only_pid}) was stopped by a signal"
        elif process_alive(tags):
            continue
        else:
            reason = f"the process that ran it (pid {tags.get(PID_TAG)}) is gone"
        instance.report_run_failed(run, message=f"Marked failed by fineinstructions: {reason}.")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


def _holders(instance: DagsterInstance, pool: str) -> tuple[int, list[tuple[str, str]]]:
    storage = instance.event_log_storage
    if storage.get_concurrency_info(pool).slot_count == 0:
        storage.initialize_concurrency_limit_to_default(pool)  # as a step does before its first claim
    info = storage.get_concurrency_info(pool)
    return info.slot_count, [(c.run_id, c.step_key) for c in info.claimed_slots]


def wait_for_pools(
    instance: DagsterInstance,
    pools: Iterable[str],
    timeout_s: float,
    say: Callable[[str], None],
    poll_s: float = 2.0,
    every_s: float = 30.0,
) -> None:
    """Wait until each pool has a free slot, saying who holds it; PoolTimeout after `timeout_s`.

    Slots held by runs whose process is gone are freed on the way."""
    deadline = time.monotonic() + timeout_s
    last_said = 0.0
    for pool in pools:
        while True:
            slots, claimed = _holders(instance, pool)
            if slots <= 0 or len(claimed) < slots:  # an unlimited pool, or a free slot
                break
            if reap_dead_runs(instance):
                continue
            held = ", ".join(f"run {r[:8]} ({step})" for r, step in claimed)
            now = time.monotonic()
            if now >= deadline:
                raise PoolTimeout(
                    f"gave up after {timeout_s:.0f}s waiting for concurrency pool {pool!r} ({slots} slot(s)), held by "
                    f"{held}; wait for that run to finish, cancel it in the Dagster UI, or raise --pool-timeout"
                )
            if now - last_said >= every_s:
                say(f"  waiting for concurrency pool {pool!r}: held by {held}")
                last_said = now
            time.sleep(poll_s)


def cli_run_config(config_path: str | Path, overrides: str = "", log_level: str = "INFO") -> dict[str, Any]:
    """The run config of a CLI run, which a re-execution from the UI reuses: the config file and its
    `--set` overrides as the `fi` resource's config, and every step in this process (the CLI refuses
    to run under another executor)."""
    return {
        "resources": {"fi": {"config": {"config_path": str(config_path), "overrides": overrides}}},
        "loggers": {"console": {"config": {"log_level": log_level}}},
        "execution": {"config": {"in_process": {}}},
    }


def remote_job_origin(job_name: str, env: Mapping[str, str] | None = None) -> RemoteJobOrigin:
    """The origin a UI launch of `job_name` has: the code location is named after the module, as
    workspace.yaml names it, or FI_LOCATION_NAME where a workspace gives it another `location_name`."""
    location = ((os.environ if env is None else env).get("FI_LOCATION_NAME") or "").strip() or CODE_LOCATION
    target = LoadableTargetOrigin(
        executable_path=sys.executable,
        module_name=CODE_LOCATION,
        working_directory=WORKING_DIRECTORY,
    )
    return RemoteJobOrigin(
        RemoteRepositoryOrigin(ManagedGrpcPythonEnvCodeLocationOrigin(target, location), REPOSITORY), job_name
    )


def execute_defined_job(
    instance: DagsterInstance,
    job_name: str,
    selection: Sequence[str],
    partition: str | None,
    run_config: Mapping[str, Any],
    tags: Mapping[str, str],
) -> JobExecutionResult:
    """Run `selection` (asset names) of the defined job `job_name` for one partition, in this process, as
    a normal run of the instance: UI-launched runs carry the same origin, so the UI treats both alike."""
    repo = ReconstructableRepository.for_module(CODE_LOCATION, DEFINITIONS_ATTRIBUTE, WORKING_DIRECTORY)
    job = repo.get_reconstructable_job(job_name)
    run_tags = {**tags, **({"dagster/partition": partition} if partition else {})}
    run = instance.create_run_for_job(
        job_def=job.get_definition(),
        run_config=run_config,
        tags=run_tags,
        asset_selection=frozenset(AssetKey(a) for a in selection),
        remote_job_origin=remote_job_origin(job_name),
        job_code_origin=job.get_python_origin(),
    )
    return execute_run(job, run, instance, raise_on_error=False)
