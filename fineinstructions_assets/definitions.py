"""The code location: every asset, the partition sensor, jobs and the config resource."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job

from .assets import ALL_ASSETS
from .resources import FineInstructionsResource
from .sensors import partition_registration_sensor

query_source_job = define_asset_job(
    "query_source_job",
    AssetSelection.assets("raw_queries", "query_set", "template_bank"),
    description="One query source: read, filter, genericize.",
)
corpus_shard_job = define_asset_job(
    "corpus_shard_job",
    AssetSelection.assets("documents", "document_index", "template_matches", "instruction_pairs", "judged_corpus"),
    description="One corpus shard: read, embed, match, instantiate, judge.",
)

defs = Definitions(
    assets=ALL_ASSETS,
    jobs=[query_source_job, corpus_shard_job],
    sensors=[partition_registration_sensor],
    resources={"fi": FineInstructionsResource()},
)
