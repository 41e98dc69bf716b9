"""The code location: every asset, the partition sensor, jobs and the config resource, from the registry."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job

from fineinstructions_core.registry import REGISTRY, Partitioning, Registry

from .assets import build_assets
from .resources import FineInstructionsResource
from .sensors import build_partition_sensor

_JOBS = {
    Partitioning.QUERY_SOURCE: ("query_source_job", "One query source: read, filter, genericize."),
    Partitioning.CORPUS_SHARD: ("corpus_shard_job", "One corpus shard: read, embed, match, instantiate, judge."),
}


def build_jobs(registry: Registry = REGISTRY) -> list:
    """One job per partition set: the stages of the default run split that way."""
    jobs = []
    for partitioning, (name, description) in _JOBS.items():
        stages = registry.partitioned_by(partitioning)
        if stages:
            jobs.append(define_asset_job(name, AssetSelection.assets(*stages), description=description))
    return jobs


def build_definitions(registry: Registry = REGISTRY) -> Definitions:
    return Definitions(
        assets=build_assets(registry),
        jobs=build_jobs(registry),
        sensors=[build_partition_sensor(registry)],
        resources={"fi": FineInstructionsResource()},
    )


defs = build_definitions()
