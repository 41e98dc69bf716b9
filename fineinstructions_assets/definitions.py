"""The code location: every asset, the sensors, jobs and the config resource, from the registry."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from dagster import AssetSelection, Definitions, ExecutorDefinition, define_asset_job

from fineinstructions_core.registry import REGISTRY, Partitioning, Registry

from .assets import build_assets
from .resources import FineInstructionsResource
from .sensors import build_automation_sensors, build_partition_sensor

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


def build_jobs(registry: Registry = REGISTRY) -> list:
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


# FI_EXECUTOR names a step executor of an installed Dagster integration (the default: steps in the run's
# process tree); FI_EXECUTOR_CONFIG, a YAML file whose `execution.config` configures it, so that runs
# started by sensors, automation and backfills get the same settings as a launch with that run config.
EXECUTORS = {  # name: (module, attribute, the package it needs)
    "k8s": ("dagster_k8s", "k8s_job_executor", "dagster-k8s"),
    "dask": ("fineinstructions_assets.dask_executor", "dask_executor", "distributed"),
}


def executor_from_env(env: dict[str, str] | None = None) -> ExecutorDefinition | None:
    """The step executor the environment asks for, configured from its file; None for the default."""
    env = dict(os.environ) if env is None else env
    name = env.get("FI_EXECUTOR", "").strip()
    if not name:
        return None
    if name not in EXECUTORS:
        raise ValueError(f"FI_EXECUTOR={name!r} is not one of {', '.join(EXECUTORS)} (unset: the default executor)")
    path = env.get("FI_EXECUTOR_CONFIG", "").strip()
    config = _executor_config(path) if path else None
    module, attr, package = EXECUTORS[name]
    try:
        executor = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ImportError(f"FI_EXECUTOR={name} needs the package {package}: {exc}") from exc
    return executor if config is None else executor.configured(config)


def _executor_config(path: str) -> dict:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"FI_EXECUTOR_CONFIG={path}: cannot be read as YAML ({exc})") from exc
    execution = doc.get("execution") if isinstance(doc, dict) else None
    config = execution.get("config") if isinstance(execution, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"FI_EXECUTOR_CONFIG={path}: expected an execution.config mapping")
    return config


def build_definitions(registry: Registry = REGISTRY) -> Definitions:
    return Definitions(
        assets=build_assets(registry),
        jobs=build_jobs(registry),
        sensors=[build_partition_sensor(registry), *build_automation_sensors(registry)],
        resources={"fi": FineInstructionsResource()},
        executor=executor_from_env(),
    )


defs = build_definitions()
