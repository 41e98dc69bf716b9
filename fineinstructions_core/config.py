"""The project config: one YAML file naming query sources, corpora, models and thresholds.

Every field can be overridden per run (a nested dict merged on top) or from the environment
(`FI_DATA_DIR`, `FI_SCALE`, `FI_CONFIG`), so the same file serves the demo and a full run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_NAME = "fineinstructions.yaml"
QUERY_FORMATS = ("jsonl", "json", "tsv", "tsv.gz")
_MODEL_KEYS = {"backend", "model", "max_new_tokens", "temperature", "batch_size", "prompt_format", "constrained"}
BACKENDS = ("transformers", "vllm", "openai")
# A stage's prompt format belongs to the model family it talks to, not to the backend that runs it:
# the first one is the default (the few-shot prompts the embedded model needs); "fineinstructions" is
# the bare input framing the released fineinstructions/* models were trained on.
PROMPT_FORMATS = {
    "genericize": ("fewshot", "fineinstructions"),
    "instantiate": ("fewshot", "fineinstructions"),
    "judge": ("flow_judge",),
}
CORPUS_FORMATS = ("jsonl", "text")


CALIBRATED_THRESHOLD_FILE = "matching_threshold.json"


class ConfigError(ValueError):
    """Raised with a message that names the offending config key."""


@dataclass(frozen=True)
class QuerySource:
    name: str
    path: str
    format: str
    text_field: str | None = None
    text_column: int | None = None

    def files(self, root: Path) -> list[Path]:
        return _glob(root, self.path)


@dataclass(frozen=True)
class Corpus:
    name: str
    path: str
    format: str
    text_field: str = "text"
    id_field: str | None = None
    title_field: str | None = None
    shard_size: int | None = None

    def files(self, root: Path) -> list[Path]:
        return _glob(root, self.path)


@dataclass(frozen=True)
class ModelSpec:
    """One stage's model: which backend runs it and how it decodes."""

    backend: str
    model: str
    max_new_tokens: int
    temperature: float = 0.0
    batch_size: int = 8
    prompt_format: str = ""  # "" = the stage's default format
    constrained: bool | None = None  # None = the stage section's constrained_* switch
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific: base_url, concurrency, ...


@dataclass
class Config:
    root: Path
    data_dir: Path
    scale: str
    demo: dict[str, int]
    shard_size: int
    query_sources: list[QuerySource]
    corpora: list[Corpus]
    query_filters: dict[str, Any]
    genericize: dict[str, Any]
    matching: dict[str, Any]
    instantiation: dict[str, Any]
    judge: dict[str, Any]
    training: dict[str, Any]
    models: dict[str, ModelSpec]
    embedder: str
    cache_dir: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    def threshold_file(self) -> Path | None:
        """Where a `calibrated` profile's threshold lives: beside its embedder's weights."""
        value = self.section("profile.matching_threshold")
        return Path(self.embedder) / CALIBRATED_THRESHOLD_FILE if value == "calibrated" else None

    def matching_threshold(self) -> float:
        """The profile's threshold, a number or `calibrated` (what the matching_embedding asset measured
        for the embedder it trained); else `matching.threshold`. Similarity scales differ per model."""
        path = self.threshold_file()
        if path is None:
            value = self.section("profile.matching_threshold")
            return float(self.matching.get("threshold", 0.3) if value is None else value)
        if not path.parent.is_dir():
            raise ConfigError(
                f"matching_threshold: calibrated needs the embedder to be a local model directory (the "
                f"matching_embedding asset's output), not {self.embedder!r}; give the profile a number"
            )
        if not path.exists():
            raise ConfigError(
                f"matching_threshold: calibrated needs {path}, which the matching_embedding asset writes beside "
                "the embedder it trains; materialize it first or give the profile a number"
            )
        return float(json.loads(path.read_text(encoding="utf-8"))["threshold"])

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.duckdb"

    @property
    def request_cache_path(self) -> Path:
        return self.data_dir / "request_cache.sqlite"

    def source(self, name: str) -> QuerySource:
        for s in self.query_sources:
            if s.name == name:
                return s
        raise ConfigError(f"query source {name!r} is not in the config (have: {[s.name for s in self.query_sources]})")

    def corpus(self, name: str) -> Corpus:
        for c in self.corpora:
            if c.name == name:
                return c
        raise ConfigError(f"corpus {name!r} is not in the config (have: {[c.name for c in self.corpora]})")

    def limit(self, key: str) -> int | None:
        """Demo-size limits apply only at `scale: demo`; `scale: full` runs the whole sample."""
        return int(self.demo[key]) if self.scale == "demo" and self.demo.get(key) else None

    def stage_fingerprint(self, *sections: str) -> str:
        """A hash of the config sections a stage depends on, recorded with each output."""
        blob = json.dumps({s: self.section(s) for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def section(self, path: str) -> Any:
        """A dotted config path; `profile.` stands for the active model profile, `teacher.` for the
        distillation teacher's (`distillation.teacher_profile`)."""
        node: Any = self.raw
        parts = path.split(".")
        if parts[0] in ("profile", "teacher"):
            name = (
                self.raw.get("model_profile", "embedded")
                if parts[0] == "profile"
                else (self.raw.get("distillation") or {}).get("teacher_profile", "embedded")
            )
            node = (self.raw.get("model_profiles") or {}).get(name) or {}
            parts = parts[1:]
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        return node


def _glob(root: Path, pattern: str) -> list[Path]:
    p = Path(pattern)
    base = p if p.is_absolute() else root / p
    if any(ch in pattern for ch in "*?["):
        anchor = Path(base.anchor)
        rel = base.relative_to(anchor)
        return sorted(anchor.glob(str(rel)))
    return [base] if base.exists() else []


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def default_config_path() -> Path:
    env = os.environ.get("FI_CONFIG")
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_CONFIG_NAME


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    path = Path(path) if path else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file not found: {path} (set FI_CONFIG or pass --config)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = _deep_merge(raw, overrides or {})
    if os.environ.get("FI_SCALE"):
        raw["scale"] = os.environ["FI_SCALE"]
    if os.environ.get("FI_DATA_DIR"):
        raw["data_dir"] = os.environ["FI_DATA_DIR"]
    return parse_config(raw, root=path.resolve().parent)


def expand_model_path(model: str, root: Path, data_dir: Path) -> str:
    """`{data_dir}` and `{root}` in a model path, so a profile can name models the project trains."""
    return model.replace("{data_dir}", str(data_dir)).replace("{root}", str(root))


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] in (None, ""):
        raise ConfigError(f"{where}: missing required key {key!r}")
    return d[key]


def parse_config(raw: dict[str, Any], root: Path) -> Config:
    data_dir = Path(raw.get("data_dir", "data"))
    data_dir = data_dir if data_dir.is_absolute() else root / data_dir
    scale = raw.get("scale", "demo")
    if scale not in ("demo", "full"):
        raise ConfigError(f"scale must be 'demo' or 'full', not {scale!r}")
    sources = []
    for i, s in enumerate(raw.get("query_sources") or []):
        where = f"query_sources[{i}]"
        fmt = _require(s, "format", where)
        if fmt not in QUERY_FORMATS:
            raise ConfigError(f"{where}: format {fmt!r} is not one of {QUERY_FORMATS}")
        if fmt in ("jsonl", "json") and not s.get("text_field"):
            raise ConfigError(f"{where}: format {fmt} needs text_field")
        sources.append(
            QuerySource(
                name=_require(s, "name", where),
                path=_require(s, "path", where),
                format=fmt,
                text_field=s.get("text_field"),
                text_column=int(s.get("text_column", 0)),
            )
        )
    corpora = []
    for i, c in enumerate(raw.get("corpora") or []):
        where = f"corpora[{i}]"
        fmt = _require(c, "format", where)
        if fmt not in CORPUS_FORMATS:
            raise ConfigError(f"{where}: format {fmt!r} is not one of {CORPUS_FORMATS}")
        name = _require(c, "name", where)
        if "-" in name:
            raise ConfigError(f"{where}: corpus name {name!r} may not contain '-' (it separates shard numbers)")
        corpora.append(
            Corpus(
                name=name,
                path=_require(c, "path", where),
                format=fmt,
                text_field=c.get("text_field", "text"),
                id_field=c.get("id_field"),
                title_field=c.get("title_field"),
                shard_size=c.get("shard_size"),
            )
        )
    names = [s.name for s in sources] + [c.name for c in corpora]
    if len(set(names)) != len(names):
        raise ConfigError(f"source and corpus names must be unique: {names}")
    profile = raw.get("model_profile", "embedded")
    profiles = raw.get("model_profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"model_profile {profile!r} is not defined under model_profiles ({list(profiles)})")
    threshold = (profiles[profile] or {}).get("matching_threshold")
    if threshold is not None and threshold != "calibrated" and not isinstance(threshold, int | float):
        raise ConfigError(
            f"model_profiles.{profile}.matching_threshold must be a number or 'calibrated', not {threshold!r}"
        )
    models = {}
    for stage in ("genericize", "instantiate", "judge"):
        spec = (profiles[profile] or {}).get(stage)
        if not spec:
            raise ConfigError(f"model_profiles.{profile}.{stage} is missing")
        if spec.get("backend", "transformers") not in BACKENDS:
            raise ConfigError(f"model_profiles.{profile}.{stage}.backend must be one of {BACKENDS}")
        fmt = spec.get("prompt_format") or PROMPT_FORMATS[stage][0]
        if fmt not in PROMPT_FORMATS[stage]:
            raise ConfigError(
                f"model_profiles.{profile}.{stage}.prompt_format {fmt!r} is not one of {PROMPT_FORMATS[stage]}"
            )
        models[stage] = ModelSpec(
            backend=spec.get("backend", "transformers"),
            model=expand_model_path(str(_require(spec, "model", f"model_profiles.{profile}.{stage}")), root, data_dir),
            max_new_tokens=int(spec.get("max_new_tokens", 128)),
            temperature=float(spec.get("temperature", 0.0)),
            batch_size=int(spec.get("batch_size", 8)),
            prompt_format=fmt,
            constrained=None if spec.get("constrained") is None else bool(spec["constrained"]),
            options={k: v for k, v in spec.items() if k not in _MODEL_KEYS},
        )
    cache_dir = Path(
        os.environ.get("FI_MODEL_CACHE")
        or raw.get("model_cache_dir")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fineinstructions"
    )
    return Config(
        root=root,
        data_dir=data_dir,
        scale=scale,
        demo=dict(raw.get("demo") or {}),
        shard_size=int(raw.get("shard_size", 8)),
        query_sources=sources,
        corpora=corpora,
        query_filters=dict(raw.get("query_filters") or {}),
        genericize=dict(raw.get("genericize") or {}),
        matching=dict(raw.get("matching") or {}),
        instantiation=dict(raw.get("instantiation") or {}),
        judge=dict(raw.get("judge") or {}),
        training=dict(raw.get("training") or {}),
        models=models,
        embedder=expand_model_path(
            str((profiles[profile] or {}).get("embedder", "embedded:all-MiniLM-L6-v2")), root, data_dir
        ),
        cache_dir=cache_dir,
        raw=raw,
    )
