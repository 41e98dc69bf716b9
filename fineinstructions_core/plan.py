"""What is stale: content signatures so a rerun recomputes only partitions whose inputs changed.

A partition's signature hashes, for its stage as declared in the registry: the code the stage runs
(its function and the project functions, classes and constants it reaches, see `codesig`), its config
values, the weights of every local model those name, the files outside the lake it reads, and the
bytes of the lake files it reads. It is stored in the partition's accounting record; a partition
whose stored signature equals the current one is fresh and is skipped by `fineinstructions run`.
Because upstream outputs are hashed by content, a rerun that reproduces the same upstream bytes (the
request cache makes LLM stages reproducible) leaves everything downstream fresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .codesig import code_signature
from .config import Config, expand_model_path
from .io.lake import UNPARTITIONED, Lake
from .llm.models import weights_identity
from .registry import REGISTRY, Partitioning, Registry, StageSpec
from .stage_base import Logger, StageContext, StageResult

log = logging.getLogger(__name__)

_MODEL_KEYS = ("model", "embedder", "student", "base")


def _file_hash(path: Path, h: Any) -> None:
    h.update(str(path.name).encode())
    if not path.exists():
        h.update(b"<missing>")
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _models_in(value: Any, key: str) -> list[str]:
    """Model names or paths in a config value: its `model`, `embedder`, `student` and `base` entries."""
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _models_in(v, k)]
    return [value] if isinstance(value, str) and key in _MODEL_KEYS else []


def _model_identities(cfg: Config, values: dict[str, Any]) -> list[str]:
    """The weights of every local model the values name: a model retrained in place is a new model."""
    return [
        weights_identity(Path(expand_model_path(model, cfg.root, cfg.data_dir))) or ""
        for name, value in sorted(values.items())
        for model in _models_in(value, name.rsplit(".", 1)[-1])
    ]


def input_partitions(
    spec: StageSpec, upstream: StageSpec, partition: str, sources: Sequence[str], shards: Sequence[str]
) -> list[str]:
    """The partitions of `upstream` that `spec`'s partition reads: the same key when both are split the
    same way, every active key when `spec` gathers a partitioned stage, else the single output."""
    if not upstream.partitioned:
        return [UNPARTITIONED]
    if upstream.partitioning is spec.partitioning:
        return [partition]
    return sorted(sources if upstream.partitioning is Partitioning.QUERY_SOURCE else shards)


def signature(
    cfg: Config,
    asset: str,
    partition: str,
    sources: Sequence[str],
    shards: Sequence[str],
    registry: Registry = REGISTRY,
) -> str:
    """The signature of one (stage, partition) under `cfg` (see the module docstring)."""
    spec = registry[asset]
    deps = spec.dependencies(cfg, partition)
    lake = Lake(cfg.lake_dir)
    h = hashlib.sha256()
    h.update(asset.encode())
    h.update(code_signature(spec.compute).encode())
    h.update(json.dumps(deps.values, sort_keys=True, default=str).encode())
    for identity in _model_identities(cfg, deps.values):
        h.update(identity.encode())
    for path in deps.files:
        _file_hash(path, h)
    for name in deps.reads or ():
        upstream = registry[name]
        for key in input_partitions(spec, upstream, partition, sources, shards):
            _file_hash(lake.path(name, key), h)
        for side in upstream.side_files:
            _file_hash(cfg.lake_dir / name / side, h)
    return h.hexdigest()[:24]


def is_fresh(cfg: Config, asset: str, partition: str, sig: str) -> bool:
    """Built from these inputs, and complete: a partition with failed LLM requests (timeouts, a server
    that gave up) is rerun, and the request cache makes every answer it already has free."""
    lake = Lake(cfg.lake_dir)
    acc = lake.read_accounting(asset, partition)
    extra = (acc or {}).get("extra") or {}
    llm_errors = int((extra.get("llm") or {}).get("errors") or 0)
    return bool(acc and lake.exists(asset, partition) and extra.get("signature") == sig and not llm_errors)


def partition_keys(partitioning: Partitioning, sources: Sequence[str], shards: Sequence[str]) -> list[str]:
    if partitioning is Partitioning.QUERY_SOURCE:
        return list(sources)
    if partitioning is Partitioning.CORPUS_SHARD:
        return list(shards)
    return [UNPARTITIONED]


def stale_chain(
    cfg: Config,
    chain: Sequence[str],
    partition: str,
    sources: Sequence[str],
    shards: Sequence[str],
    force: bool = False,
    registry: Registry = REGISTRY,
) -> list[str]:
    """The first stale stage of `chain` for this partition and every stage of the chain after it."""
    for i, asset in enumerate(chain):
        if force or not is_fresh(cfg, asset, partition, signature(cfg, asset, partition, sources, shards, registry)):
            return list(chain[i:])
    return []


def runs_to_do(
    cfg: Config,
    sources: Sequence[str],
    shards: Sequence[str],
    include_on_demand: bool = False,
    force: bool = False,
    registry: Registry = REGISTRY,
) -> Iterator[tuple[list[str], str | None]]:
    """A full pass in the registry's order: (stages, partition or None) for each run that has work.

    Lazy on purpose: staleness of a step is decided after the runs before it have finished, so an
    unpartitioned stage whose inputs came out byte-identical is skipped.
    """
    for partitioning, chain in registry.run_segments(include_on_demand):
        for key in partition_keys(partitioning, sources, shards):
            todo = stale_chain(cfg, chain, key, sources, shards, force, registry)
            if todo:
                yield todo, None if key == UNPARTITIONED else key


def run_stage(
    cfg: Config,
    asset: str,
    partition: str,
    sources: list[str],
    shards: list[str],
    logger: Logger = log.info,
    registry: Registry = REGISTRY,
) -> StageResult:
    """Run one (stage, partition) and stamp its accounting with the signature it was built from."""
    spec = registry[asset]
    sig = signature(cfg, asset, partition, sources, shards, registry)
    started = time.perf_counter()
    ctx = StageContext(
        cfg, spec.name, spec.contract.unit, partition, list(sources), list(shards), logger, registry.ancestors(asset)
    )
    result = spec.compute(ctx)
    result.accounting.extra["signature"] = sig
    result.accounting.extra["seconds"] = round(time.perf_counter() - started, 3)
    Lake(cfg.lake_dir).write_accounting(result.accounting)
    return result
