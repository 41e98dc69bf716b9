"""The partition sensor: registers query sources and corpus shards from the config and runs new ones."""

from dagster import AssetKey, DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, sensor

from fineinstructions_core.config import ConfigError
from fineinstructions_core.plan import QUERY_CHAIN, SHARD_CHAIN

from .partitions import corpus_shards, desired_partitions, query_sources
from .resources import FineInstructionsResource

CHAINS = ((query_sources, QUERY_CHAIN), (corpus_shards, SHARD_CHAIN))


@sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    asset_selection=[AssetKey(a) for a in QUERY_CHAIN + SHARD_CHAIN],
    description="Registers query sources and corpus shards from the config and runs each new one's chain.",
)
def partition_registration_sensor(context: SensorEvaluationContext, fi: FineInstructionsResource) -> SensorResult:
    try:
        wanted = desired_partitions(fi.load())
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return SensorResult(skip_reason=f"config problem: {exc}")
    requests, adds = [], []
    for pdef, chain in CHAINS:
        have = set(context.instance.get_dynamic_partitions(pdef.name))
        new = [k for k in wanted[pdef.name] if k not in have]
        if new:
            adds.append(pdef.build_add_request(new))
            requests += [
                RunRequest(run_key=f"{pdef.name}:{k}", partition_key=k, asset_selection=[AssetKey(a) for a in chain])
                for k in new
            ]
    if not adds:
        return SensorResult(skip_reason="no new query source or corpus shard")
    return SensorResult(run_requests=requests, dynamic_partitions_requests=adds)
