"""What is stale: content signatures so a rerun recomputes only partitions whose inputs changed.

A partition's signature hashes the config sections and code of its stage with the bytes of its inputs
(upstream lake files or source files). It is stored in the partition's accounting record; a partition
whose stored signature equals the current one is fresh and is skipped by `fineinstructions run`.
Because upstream outputs are hashed by content, a rerun that reproduces the same upstream bytes (the
request cache makes LLM stages reproducible) leaves everything downstream fresh.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import (
    budget,
    compatibility,
    distill,
    embed,
    evaluation,
    excerpts,
    genericize,
    index,
    instantiate,
    judge,
    match,
    queries,
    templates,
    training,
)
from . import distill_stages as ds
from .config import Config, expand_model_path
from .io import readers
from .io.lake import UNPARTITIONED, Lake
from .llm import constraints
from .llm.models import weights_identity
from .shards import get_shard

QUERY_CHAIN = ["raw_queries", "query_set", "template_bank"]
SHARD_CHAIN = ["documents", "document_index", "template_matches", "instruction_pairs", "judged_corpus"]

_CONFIG = {
    "raw_queries": ("query_sources", "scale", "demo"),
    "query_set": ("query_filters",),
    "template_bank": ("profile.genericize", "genericize"),
    "template_index": ("matching.exact_below", "matching.index_factory", "matching.nprobe", "profile.embedder"),
    "documents": ("corpora", "max_document_chars"),
    "document_index": ("matching.k", "matching.sigma", "matching.alpha", "profile.embedder"),
    "template_matches": ("matching", "profile.matching_threshold"),
    "instruction_pairs": ("instantiation", "profile.instantiate"),
    "judged_corpus": ("judge", "profile.judge"),
    "training_corpus": ("training",),
    # The distillation loop's settings are the teacher profile's, never the active one's (its inputs,
    # query_set and template_matches, are what the pipeline made).
    "silver_genericizer_examples": (
        "distillation.teacher_profile",
        "distillation.seed",
        "distillation.silver_genericizer_queries",
        "teacher.genericize",
        "genericize",
    ),
    "silver_instantiation_examples": (
        "distillation.teacher_profile",
        "distillation.seed",
        "distillation.silver_instantiation_matches",
        "teacher.instantiate",
        "instantiation",
    ),
    "genericizer_model": ("distillation.student", "distillation.seed", "distillation.genericizer"),
    "instantiator_model": ("distillation.student", "distillation.seed", "distillation.instantiator"),
    # distillation.embedding is hashed in `signature`, its teacher_judgment settings only when used.
    "matching_embedding": ("distillation.seed", "matching.k", "matching.sigma", "matching.alpha", "matching.threshold"),
}
_CODE = {
    "raw_queries": (readers,),
    "query_set": (queries,),
    "template_bank": (genericize, templates, constraints),
    "template_index": (embed, index),
    "documents": (readers,),
    "document_index": (embed,),
    "template_matches": (match, index),
    "instruction_pairs": (instantiate, excerpts, constraints),
    "judged_corpus": (judge, constraints),
    "training_corpus": (budget,),
    "silver_genericizer_examples": (distill, genericize, templates, ds.silver_genericizer_examples),
    "silver_instantiation_examples": (distill, instantiate, excerpts, constraints, ds.silver_instantiation_examples),
    "genericizer_model": (distill, training, ds.genericizer_model, ds._train_student),
    "instantiator_model": (distill, training, ds.instantiator_model, ds._train_student),
    "matching_embedding": (distill, training, embed, evaluation, ds.matching_embedding, ds.labelled_pairs),
}
UPSTREAM = {
    "query_set": "raw_queries",
    "template_bank": "query_set",
    "document_index": "documents",
    "instruction_pairs": "template_matches",
    "judged_corpus": "instruction_pairs",
}


def _file_hash(path: Path, h: hashlib._Hash) -> None:
    h.update(str(path.name).encode())
    if not path.exists():
        h.update(b"<missing>")
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


_MODEL_KEYS = ("model", "embedder", "student", "base")


def _models_in(value: Any, key: str) -> list[str]:
    """Model names or paths in a config section: its `model`, `embedder`, `student` and `base` values."""
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _models_in(v, k)]
    return [value] if isinstance(value, str) and key in _MODEL_KEYS else []


def _hash_models(cfg: Config, sections: Sequence[str], h: hashlib._Hash) -> None:
    """The weights of every local model the sections name: a model retrained in place is a new model."""
    for section in sections:
        for model in _models_in(cfg.section(section), section.rsplit(".", 1)[-1]):
            h.update((weights_identity(Path(expand_model_path(model, cfg.root, cfg.data_dir))) or "").encode())


def signature(cfg: Config, asset: str, partition: str, sources: list[str], shards: list[str]) -> str:
    lake = Lake(cfg.lake_dir)
    h = hashlib.sha256()
    h.update(asset.encode())
    h.update(cfg.stage_fingerprint(*_CONFIG[asset]).encode())
    _hash_models(cfg, _CONFIG[asset], h)
    threshold_file = cfg.threshold_file() if "profile.matching_threshold" in _CONFIG[asset] else None
    if threshold_file is not None:
        _file_hash(threshold_file, h)
    for mod in _CODE[asset]:
        h.update(inspect.getsource(mod).encode())
        if hasattr(mod, "prompt_fingerprint"):
            h.update(mod.prompt_fingerprint().encode())
    if asset == "raw_queries":
        for f in cfg.source(partition).files(cfg.root):
            _file_hash(f, h)
    elif asset == "documents":
        shard = get_shard(cfg, partition)
        for seg in shard.segments:
            h.update(f"{seg.file}:{seg.start}:{seg.stop}".encode())
            _file_hash(cfg.root / seg.file, h)
    elif asset == "template_index":
        for s in sorted(sources):
            _file_hash(lake.path("template_bank", s), h)
    elif asset == "template_matches":
        _file_hash(lake.path("document_index", partition), h)
        _file_hash(lake.path("template_index", UNPARTITIONED), h)
        _file_hash(cfg.lake_dir / "template_index" / "index.faiss", h)
    elif asset == "training_corpus":
        for s in sorted(shards):
            _file_hash(lake.path("judged_corpus", s), h)
    elif asset == "silver_genericizer_examples":
        _file_hash(distill.SEEDS_DIR / "genericizer.jsonl", h)
        for s in sorted(sources):
            _file_hash(lake.path("query_set", s), h)
    elif asset == "silver_instantiation_examples":
        _file_hash(distill.SEEDS_DIR / "instantiation.jsonl", h)
        _file_hash(lake.path("template_index", UNPARTITIONED), h)
        for s in sorted(shards):
            _file_hash(lake.path("template_matches", s), h)
    elif asset in ("genericizer_model", "instantiator_model"):
        upstream = "silver_genericizer_examples" if asset == "genericizer_model" else "silver_instantiation_examples"
        _file_hash(lake.path(upstream, UNPARTITIONED), h)
    elif asset == "matching_embedding":
        e = dict((cfg.raw.get("distillation") or {}).get("embedding") or {})
        judged = e.get("labels") == "teacher_judgment"
        if not judged:
            e.pop("teacher_judgment", None)
        h.update(json.dumps(e, sort_keys=True, default=str).encode())
        _hash_models(cfg, ["distillation.embedding.base"], h)
        for key in ("questions", "paragraphs"):
            _file_hash(cfg.root / str(e.get(key, "")), h)
        if judged:  # the teacher's judge, its criteria, and what it judged
            sections = ("distillation.teacher_profile", "teacher.judge", "judge", "instantiation.window_chars")
            h.update(cfg.stage_fingerprint(*sections).encode())
            _hash_models(cfg, ["teacher.judge"], h)
            for mod in (compatibility, judge, ds.teacher_judged_pairs):
                h.update(inspect.getsource(mod).encode())
            h.update(compatibility.prompt_fingerprint().encode())
            _file_hash(lake.path("template_index", UNPARTITIONED), h)
            for s in sorted(shards):
                _file_hash(lake.path("template_matches", s), h)
                _file_hash(lake.path("documents", s), h)
    else:
        _file_hash(lake.path(UPSTREAM[asset], partition), h)
    return h.hexdigest()[:24]


def is_fresh(cfg: Config, asset: str, partition: str, sig: str) -> bool:
    """Built from these inputs, and complete: a partition with failed LLM requests (timeouts, a server
    that gave up) is rerun, and the request cache makes every answer it already has free."""
    lake = Lake(cfg.lake_dir)
    acc = lake.read_accounting(asset, partition)
    extra = (acc or {}).get("extra") or {}
    llm_errors = int((extra.get("llm") or {}).get("errors") or 0)
    return bool(acc and lake.exists(asset, partition) and extra.get("signature") == sig and not llm_errors)
