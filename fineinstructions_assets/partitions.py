"""Dynamic partitions, registered from the project config by a sensor and by `fineinstructions register`."""

from __future__ import annotations

from dagster import DagsterInstance, DynamicPartitionsDefinition

from fineinstructions_core.config import Config
from fineinstructions_core.registry import Partitioning
from fineinstructions_core.shards import plan_all_shards

query_sources = DynamicPartitionsDefinition(name=Partitioning.QUERY_SOURCE.value)
corpus_shards = DynamicPartitionsDefinition(name=Partitioning.CORPUS_SHARD.value)
PARTITIONS: dict[Partitioning, DynamicPartitionsDefinition] = {
    Partitioning.QUERY_SOURCE: query_sources,
    Partitioning.CORPUS_SHARD: corpus_shards,
}


def desired_partitions(cfg: Config) -> dict[str, list[str]]:
    """Partition keys the config implies now (cutting new shards for new corpus files)."""
    return {
        query_sources.name: cfg.source_partitions,  # query sources and template sources
        corpus_shards.name: [s.key for s in plan_all_shards(cfg)],
    }


def register_partitions(cfg: Config, instance: DagsterInstance) -> dict[str, list[str]]:
    """Add the keys that are missing; returns the new ones per partition set."""
    added: dict[str, list[str]] = {}
    for name, keys in desired_partitions(cfg).items():
        have = set(instance.get_dynamic_partitions(name))
        new = [k for k in keys if k not in have]
        if new:
            instance.add_dynamic_partitions(name, new)
        added[name] = new
    return added


def active_partitions(cfg: Config, instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """Registered keys that the config still implies: a source or corpus removed from the config keeps
    its partitions (and their history) in the instance, but no longer feeds the index or the corpus."""
    from fineinstructions_core.shards import manifest_shard_keys

    wanted_sources = set(cfg.source_partitions)
    wanted_shards = manifest_shard_keys(cfg)
    sources = [k for k in instance.get_dynamic_partitions(query_sources.name) if k in wanted_sources]
    shards = [k for k in instance.get_dynamic_partitions(corpus_shards.name) if k in wanted_shards]
    return sources, shards
