"""The code location's jobs, one per partition set and default run, derived from the registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dagster import AssetSelection, define_asset_job

from fineinstructions_core.registry import REGISTRY, Partitioning, Registry

if TYPE_CHECKING:  # the type define_asset_job returns, not exported by dagster
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


# One job per (partitioning, default run): every run the CLI makes is a run of one of these, so the UI can
# re-execute it and its timeline shows it; the distillation loop has a job of its own, never run by default.
_JOBS: dict[tuple[Partitioning, bool], tuple[str, str]] = {
    (Partitioning.QUERY_SOURCE, True): ("query_source_job", "One query source: read, filter, genericize."),
    (Partitioning.CORPUS_SHARD, True): (
        "corpus_shard_job",
        "One corpus shard: read, embed, match, instantiate, judge.",
    ),
    (Partitioning.NONE, True): (
        "index_and_training_job",
        "The stages that read every partition: the template index, the training corpus, the models trained "
        "on it and their comparison.",
    ),
    (Partitioning.NONE, False): (
        "distillation_job",
        "On request only: silver examples from the embedded models and the small students trained on them.",
    ),
}


def build_jobs(registry: Registry = REGISTRY) -> list[UnresolvedAssetJobDefinition]:
    """The registry's stages split by partition set and default run, one asset job each."""
    jobs = []
    for (partitioning, default_run), (name, description) in _JOBS.items():
        stages = registry.partitioned_by(partitioning, default_run=default_run)
        if stages:
            jobs.append(define_asset_job(name, AssetSelection.assets(*stages), description=description))
    return jobs


def job_for(selection: Sequence[str], registry: Registry = REGISTRY) -> str:
    """The defined job that holds every stage of a planned run (the plan never mixes partition sets)."""
    kinds = {(registry[s].partitioning, registry[s].default_run) for s in selection}
    if len(kinds) != 1 or next(iter(kinds)) not in _JOBS:
        raise ValueError(f"no single job holds the stages {list(selection)}: they span {sorted(map(str, kinds))}")
    return _JOBS[next(iter(kinds))][0]


def chain_job(partitioning: Partitioning) -> str:
    """The job that runs a partition's whole default chain (what the partition sensor launches)."""
    return _JOBS[(partitioning, True)][0]

