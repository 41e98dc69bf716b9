"""The project's Dask step executor on local Dask clusters: steps run as Dask tasks, a failed step skips
what depends on it while the independent steps still run, and a step whose worker process dies gets a
failure event that says so (which frees its pool slot), its dependents skipped. (The deployment test runs
it against a real scheduler and two worker processes.)"""

from __future__ import annotations

import os

import pytest
from dagster import (
    DagsterEventType,
    Definitions,
    MaterializeResult,
    asset,
    define_asset_job,
    execute_job,
    instance_for_test,
    reconstructable,
)

from fineinstructions_assets.assets import executed_by
from fineinstructions_assets.dask_executor import dask_executor

pytest.importorskip("distributed")


@asset
def broken() -> MaterializeResult:
    raise RuntimeError("this step fails on purpose")


@asset(deps=[broken])
def after_broken() -> MaterializeResult:
    return MaterializeResult()


@asset
def fine() -> MaterializeResult:
    return MaterializeResult(metadata={"executed_by": executed_by()})


@asset(deps=[fine])
def after_fine() -> MaterializeResult:
    return MaterializeResult(metadata={"executed_by": executed_by()})


def dask_job():
    local = dask_executor.configured({"cluster": {"local": {"n_workers": 1, "processes": False}}})
    job = define_asset_job("dask_job", executor_def=local)
    return Definitions(assets=[broken, after_broken, fine, after_fine], jobs=[job]).resolve_job_def("dask_job")


def test_a_failed_step_skips_its_dependents_and_the_others_run_on_dask():
    with instance_for_test() as instance:
        result = execute_job(reconstructable(dask_job), instance=instance, raise_on_error=False)
        assert not result.success
        events = instance.all_logs(result.run_id)
        started = {e.step_key for e in events if e.dagster_event_type == DagsterEventType.STEP_START}
        succeeded = {e.step_key for e in events if e.dagster_event_type == DagsterEventType.STEP_SUCCESS}
        failed = {e.step_key for e in events if e.dagster_event_type == DagsterEventType.STEP_FAILURE}
        assert succeeded == {"fine", "after_fine"}
        assert failed == {"broken"}
        assert "after_broken" not in started  # never started on a missing input
        mats = [e for e in events if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION]
        where = {str(e.asset_materialization.metadata["executed_by"].value) for e in mats if e.asset_materialization}
        assert len(where) == 1 and next(iter(where)).startswith("dask worker 0 on "), where  # the one worker
        submitted = [e.message for e in events if "to the Dask scheduler" in (e.message or "")]
        assert len(submitted) == 3, submitted  # broken, fine, after_fine: never after_broken


@asset
def kills_its_worker() -> MaterializeResult:
    os._exit(1)  # what an OOM kill does to the worker process


@asset(deps=[kills_its_worker])
def after_the_kill() -> MaterializeResult:
    return MaterializeResult()


def dying_worker_job():
    # Worker processes (with a nanny that restarts them); Dask gives up on a task after one lost worker.
    local = dask_executor.configured({"cluster": {"local": {"n_workers": 1, "processes": True}}})
    job = define_asset_job("dying_worker_job", executor_def=local)
    return Definitions(assets=[kills_its_worker, after_the_kill], jobs=[job]).resolve_job_def("dying_worker_job")


def test_a_step_whose_worker_dies_gets_a_failure_event_with_the_reason():
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), instance_for_test() as instance:
        result = execute_job(reconstructable(dying_worker_job), instance=instance, raise_on_error=False)
        assert not result.success
        events = instance.all_logs(result.run_id)
        failures = [e for e in events if e.dagster_event_type == DagsterEventType.STEP_FAILURE]
        assert [e.step_key for e in failures] == ["kills_its_worker"]
        said = [e.message for e in events if 'Dask could not finish step "kills_its_worker"' in (e.message or "")]
        assert len(said) == 1 and "KilledWorker" in said[0], said
        started = {e.step_key for e in events if e.dagster_event_type == DagsterEventType.STEP_START}
        assert "after_the_kill" not in started
