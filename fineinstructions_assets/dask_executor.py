"""A step executor on a Dask cluster that several runs can share.

`dagster_dask.dask_executor` submits every step of a run up front, under the key `<job>.<step>`. Two
runs of one job at once (a backfill's partitions are runs of one asset job) then submit the same keys,
and Dask, which treats a key as one computation, hands the second run the first run's results without
executing its steps. This executor keys each task by run and step, and submits a step only once the
steps it depends on have succeeded (as Dagster's own executors do), so that:
- a failed step skips what depends on it, instead of those steps starting on missing inputs;
- Dagster's pools hold back steps at op granularity, across runs, as they do without Dask;
- a worker that dies mid-step holds no upstream results that Dask would recompute: Dask runs the lost
  step again on another worker (up to its `allowed-failures`); past that the step fails and the run
  with it, and a re-execution from failure runs what is left.

A task's arguments travel as Dagster's serialized values (as `dagster_celery` sends them): Dask walks
the tuples in a task's arguments, and Dagster's records (a run, its op concurrency) refuse iteration.
The configuration is `dagster_dask`'s (`cluster: existing: address:` or `cluster: local: {...}`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import distributed  # noqa: F401 - the one package FI_EXECUTOR=dask needs, checked when it is chosen
from dagster import (
    Executor,
    Field,
    Permissive,
    Selector,
    StringSource,
    executor,
    multiple_process_executor_requirements,
)
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.errors import DagsterSubprocessError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.api import create_execution_plan, execute_plan_iterator
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode
from dagster._core.instance import DagsterInstance
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value, serialize_value
from dagster._utils.error import serializable_error_info_from_exc_info

POLL_S = 0.5


def execute_step_on_worker(packed_args: str, packed_job: str) -> list[str]:
    """The Dask task: one step of a run, its events written to the instance as they happen and returned,
    serialized, to the run's orchestrator."""
    args = deserialize_value(packed_args, ExecuteStepArgs)
    job = ReconstructableJob.from_dict(json.loads(packed_job))
    if args.instance_ref is None:
        raise ValueError(f"step {args.step_keys_to_execute} of run {args.run_id} came without its instance")
    with DagsterInstance.from_ref(args.instance_ref) as instance:
        run = instance.get_run_by_id(args.run_id)
        if run is None:
            raise LookupError(f"run {args.run_id} is not in the instance this step was sent with")
        plan = create_execution_plan(
            job, run.run_config, step_keys_to_execute=args.step_keys_to_execute, known_state=args.known_state
        )
        events = execute_plan_iterator(
            plan, job, run, instance, retry_mode=args.retry_mode, run_config=run.run_config
        )
        return [serialize_value(event) for event in events]


class RunKeyedDaskExecutor(Executor):
    def __init__(self, cluster_type: str, cluster_configuration: dict[str, Any]):
        self.cluster_type = cluster_type
        self.cluster_configuration = cluster_configuration

    @property
    def retries(self) -> RetryMode:
        return RetryMode.DISABLED  # a step lost with its worker is retried by Dask itself

    @contextmanager
    def _client(self) -> Iterator[Any]:
        """A client of the scheduler configured, or of a local cluster made for this run and closed with it."""
        from distributed import Client, LocalCluster

        if self.cluster_type == "existing":
            with Client(self.cluster_configuration["address"]) as client:
                yield client
            return
        # One thread per worker: Dagster steps are not run two at a time in one process.
        settings = {"threads_per_worker": 1, **self.cluster_configuration}
        with LocalCluster(**settings) as cluster, Client(cluster) as client:
            yield client

    def execute(self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan) -> Iterator[DagsterEvent]:
        instance, run = plan_context.instance, plan_context.dagster_run
        errors: dict[str, Any] = {}
        with (
            InstanceConcurrencyContext(instance, run) as pools,
            execution_plan.start(retry_mode=self.retries, instance_concurrency_context=pools) as active,
            self._client() as client,
        ):
            futures: dict[str, Any] = {}
            while not active.is_complete or futures:
                if active.check_for_interrupts():
                    yield DagsterEvent.engine_event(
                        plan_context,
                        "Dask executor: interrupted; cancelling the steps submitted to the cluster",
                        EngineEventData.interrupted(list(futures)),
                    )
                    active.mark_interrupted()
                    client.cancel(list(futures.values()), force=True)
                    for key in list(futures):
                        del futures[key]
                        active.verify_complete(plan_context, key)
                    break
                for key in [k for k, f in futures.items() if f.done()]:
                    future = futures.pop(key)
                    try:
                        events = [deserialize_value(e, DagsterEvent) for e in future.result()]
                    except Exception:  # the step's workers died (KilledWorker), or the task itself failed
                        error = serializable_error_info_from_exc_info(sys.exc_info())
                        step_context = plan_context.for_step(active.get_step_by_key(key))
                        yield DagsterEvent.engine_event(
                            step_context,
                            f'Dask could not finish step "{key}": {error.message.strip()}',
                            EngineEventData.engine_error(error),
                        )
                        # A failure event of its own: the step's pool slot is freed, its dependents skipped.
                        event = self.log_failure_or_retry_event_after_error(
                            step_context, error, active.get_known_state()
                        )
                        events = [event]
                        if event.is_step_failure:
                            errors[key] = error
                    for event in events:
                        yield event
                        active.handle_event(event)
                    active.verify_complete(plan_context, key)
                yield from active.plan_events_iterator(plan_context)
                yield from active.concurrency_event_iterator(plan_context)  # steps waiting for a pool slot
                # A failed step's dependents are skipped (above); the steps that do not need it go on.
                for step in active.get_steps_to_execute():
                    yield DagsterEvent.engine_event(
                        plan_context.for_step(step),
                        f'Submitting step "{step.key}" to the Dask scheduler',
                        EngineEventData(),
                    )
                    step_args = ExecuteStepArgs(
                        job_origin=plan_context.reconstructable_job.get_python_origin(),
                        run_id=run.run_id,
                        step_keys_to_execute=[step.key],
                        instance_ref=instance.get_ref(),
                        retry_mode=self.retries.for_inner_plan(),
                        known_state=active.get_known_state(),
                    )
                    futures[step.key] = client.submit(
                        execute_step_on_worker,
                        serialize_value(step_args),
                        json.dumps(plan_context.reconstructable_job.to_dict()),
                        key=f"{plan_context.job_name}.{run.run_id}.{step.key}",
                        pure=False,
                    )
                time.sleep(POLL_S)
            if errors:  # raised inside the plan's context, as Dagster's own executors do
                raise DagsterSubprocessError(
                    "Dask could not finish these steps:\n"
                    + "\n".join(f"[{key}]: {error.to_string()}" for key, error in errors.items()),
                    subprocess_error_infos=list(errors.values()),
                )


@executor(
    name="dask",
    requirements=multiple_process_executor_requirements(),
    config_schema={
        "cluster": Field(
            Selector(
                {
                    "existing": Field({"address": StringSource}, description="The scheduler to connect to."),
                    "local": Field(Permissive(), description="distributed.LocalCluster arguments."),
                }
            )
        )
    },
)
def dask_executor(init_context: Any) -> RunKeyedDaskExecutor:
    """Steps as tasks on a Dask cluster, keyed by run, submitted as their inputs become ready."""
    ((cluster_type, configuration),) = init_context.executor_config["cluster"].items()
    return RunKeyedDaskExecutor(cluster_type, dict(configuration or {}))
