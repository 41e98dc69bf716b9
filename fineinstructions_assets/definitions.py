"""The code location: every asset, the sensors, jobs and the config resource, from the registry."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import yaml
from dagster import Definitions, ExecutorDefinition

from fineinstructions_core.registry import REGISTRY, Registry

from .assets import build_assets
from .jobs import build_jobs, job_for
from .resources import FineInstructionsResource
from .sensors import build_automation_sensors, build_partition_sensor

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
    jobs = build_jobs(registry)
    return Definitions(
        assets=build_assets(registry),
        jobs=jobs,
        sensors=[build_partition_sensor(registry, jobs), *build_automation_sensors(registry)],
        resources={"fi": FineInstructionsResource()},
        executor=executor_from_env(),
    )


defs = build_definitions()

__all__ = ["build_definitions", "defs", "executor_from_env", "job_for"]
