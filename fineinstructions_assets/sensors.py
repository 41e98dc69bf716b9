"""The partition sensor: registers query sources and corpus shards from the config and runs new ones."""

from __future__ import annotations

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from fineinstructions_core.config import ConfigError
from fineinstructions_core.registry import REGISTRY, Registry

from .partitions import PARTITIONS, desired_partitions
from .resources import FineInstructionsResource


def build_partition_sensor(registry: Registry = REGISTRY) -> SensorDefinition:
    """A sensor whose targets are the registry's partitioned stages of the default run."""
    chains = [(pdef, registry.partitioned_by(p)) for p, pdef in PARTITIONS.items()]
    targets = [AssetKey(a) for _, chain in chains for a in chain]

    @sensor(
        name="partition_registration_sensor",
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        asset_selection=targets,
        description="Registers query sources and corpus shards from the config and runs each new one's chain.",
    )
    def partition_registration_sensor(context: SensorEvaluationContext, fi: FineInstructionsResource) -> SensorResult:
        try:
            wanted = desired_partitions(fi.load())
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            return SensorResult(skip_reason=f"config problem: {exc}")
        requests, adds = [], []
        for pdef, chain in chains:
            have = set(context.instance.get_dynamic_partitions(pdef.name))
            new = [k for k in wanted[pdef.name] if k not in have]
            if new:
                adds.append(pdef.build_add_request(new))
                requests += [
                    RunRequest(
                        run_key=f"{pdef.name}:{k}", partition_key=k, asset_selection=[AssetKey(a) for a in chain]
                    )
                    for k in new
                ]
        if not adds:
            return SensorResult(skip_reason="no new query source or corpus shard")
        return SensorResult(run_requests=requests, dynamic_partitions_requests=adds)

    return partition_registration_sensor


partition_registration_sensor = build_partition_sensor()
