"""The sensors: one registers query sources and corpus shards from the config and runs each new one's
chain; the automation sensors carry what changed on through the graph (each asset's automation condition
says when), one for the data stages, running by default, one for the training assets, off until the
user turns it on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dagster import (
    AssetKey,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from fineinstructions_core.config import ConfigError
from fineinstructions_core.registry import REGISTRY, Registry

from .jobs import build_jobs, chain_job
from .partitions import PARTITIONS, desired_partitions
from .resources import FineInstructionsResource

if TYPE_CHECKING:  # the type define_asset_job returns, not exported by dagster
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


def _interval_s() -> int:
    """How often the sensors look for work (seconds); FI_SENSOR_INTERVAL_S changes it for the code location."""
    raw = os.environ.get("FI_SENSOR_INTERVAL_S", "30")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"FI_SENSOR_INTERVAL_S={raw!r}: expected a whole number of seconds >= 1")
    return int(raw)


SENSOR_INTERVAL_S = _interval_s()
# FI_AUTOMATION=off: the sensors that launch runs (partition registration and automation) start stopped on
# a new instance, for instance while `fineinstructions run` or a user launching backfills does the work,
# which a running sensor would otherwise repeat.
AUTOMATION_DEFAULT = (
    DefaultSensorStatus.STOPPED
    if os.environ.get("FI_AUTOMATION", "on").lower() == "off"
    else DefaultSensorStatus.RUNNING
)


def build_partition_sensor(
    registry: Registry = REGISTRY, jobs: Sequence[UnresolvedAssetJobDefinition] | None = None
) -> SensorDefinition:
    """A sensor that launches each new partition's chain as a run of its defined job (`query_source_job`,
    `corpus_shard_job`): `jobs` are the code location's own job objects (built here when not given)."""
    by_name = {j.name: j for j in (build_jobs(registry) if jobs is None else jobs)}
    chains = [(pdef, chain_job(p)) for p, pdef in PARTITIONS.items() if registry.partitioned_by(p)]

    @sensor(
        name="partition_registration_sensor",
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=AUTOMATION_DEFAULT,
        jobs=[by_name[name] for _, name in chains],
        description="Registers query sources and corpus shards from the config and runs each new one's chain.",
    )
    def partition_registration_sensor(context: SensorEvaluationContext, fi: FineInstructionsResource) -> SensorResult:
        try:
            wanted = desired_partitions(fi.load())
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            return SensorResult(skip_reason=f"config problem: {exc}")
        requests, adds = [], []
        for pdef, job_name in chains:
            have = set(context.instance.get_dynamic_partitions(pdef.name))
            new = [k for k in wanted[pdef.name] if k not in have]
            if new:
                adds.append(pdef.build_add_request(new))
                requests += [RunRequest(run_key=f"{pdef.name}:{k}", partition_key=k, job_name=job_name) for k in new]
        if not adds:
            return SensorResult(skip_reason="no new query source or corpus shard")
        return SensorResult(run_requests=requests, dynamic_partitions_requests=adds)

    return partition_registration_sensor


def build_automation_sensors(registry: Registry = REGISTRY) -> list[AutomationConditionSensorDefinition]:
    """The data stages' automation runs by default; retraining and comparing models (minutes each) only
    once the user starts `training_automation_sensor` (UI: Automation, or `dagster sensor start`)."""
    automated = [s for s in registry if s.automated]
    data = [AssetKey(s.name) for s in automated if not s.opt_in_automation]
    training = [AssetKey(s.name) for s in automated if s.opt_in_automation]
    sensors = [
        AutomationConditionSensorDefinition(
            "pipeline_automation_sensor",
            target=data,
            default_status=AUTOMATION_DEFAULT,
            minimum_interval_seconds=SENSOR_INTERVAL_S,
            emit_backfills=False,
            description="Reruns each data stage whose input changed: a new query source's templates reach the "
            "template index and every shard's matches, a new shard's pairs the training corpus.",
        )
    ]
    if training:
        sensors.append(
            AutomationConditionSensorDefinition(
                "training_automation_sensor",
                target=training,
                default_status=DefaultSensorStatus.STOPPED,
                minimum_interval_seconds=SENSOR_INTERVAL_S,
                emit_backfills=False,
                description="Opt-in: retrains and compares the models when the training corpus changed.",
            )
        )
    return sensors


partition_registration_sensor = build_partition_sensor()
