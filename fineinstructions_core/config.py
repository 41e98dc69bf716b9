"""The project config: one YAML file naming query sources, corpora, models and thresholds.

Each section is a frozen, typed settings class whose defaults are written here and nowhere else. The
whole file is validated when it loads: an unknown key, a wrong type or an out-of-range value fails with
the key's dotted path and what was expected, before any stage runs. Every field can be overridden per
run (a nested dict merged on top) or from the environment (`FI_DATA_DIR`, `FI_SCALE`, `FI_CONFIG`), so
the same file serves the demo and a full run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass as settings

from .index import DEFAULT_K_FACTOR, DEFAULT_NPROBE
from .llm.models import EMBEDDED_EMBEDDER, EMBEDDED_LLM

log = logging.getLogger(__name__)

DEFAULT_CONFIG_NAME = "fineinstructions.yaml"
QUERY_FORMATS = ("jsonl", "json", "tsv", "tsv.gz", "parquet", "arrow")
CORPUS_FORMATS = ("jsonl", "text", "parquet", "arrow")
# Column names of released template banks, so a config can say `preset: finetemplates`.
TEMPLATE_PRESETS: dict[str, dict[str, Any]] = {
    "finetemplates": {
        "template_column": "template",
        "description_column": "compatible_document_description",
        "id_column": "template_id",
        "query_column": None,
        "metadata": ["source_name"],
    },
}
BACKENDS = ("transformers", "vllm", "openai")
# Backend-specific keys a profile's stage entry may add (passed to the backend); None: any engine argument.
TRANSFORMERS_DECODE_PATHS = ("continuous", "generate")
"""The transformers backend's decode loops: its own continuous batching with shared-prefix reuse (the
default), or transformers' `generate` (the reference it is checked against)."""
BACKEND_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "transformers": ("decode",),
    "vllm": None,
    "openai": (
        "base_url",
        "identity_model",
        "concurrency",
        "timeout_s",
        "max_retries",
        "backoff_s",
        "max_backoff_s",
        "api_key",
        "tokenizer_path",
    ),
}
# A stage's prompt format belongs to the model family it talks to, not to the backend that runs it:
# the first one is the default (the few-shot prompts the embedded model needs); "fineinstructions" is
# the bare input framing the released fineinstructions/* models were trained on.
PROMPT_FORMATS = {
    "genericize": ("fewshot", "fineinstructions"),
    "instantiate": ("fewshot", "fineinstructions"),
    "judge": ("flow_judge",),
}
LLM_STAGES = tuple(PROMPT_FORMATS)
CALIBRATED_THRESHOLD_FILE = "matching_threshold.json"


class ConfigError(ValueError):
    """Raised with a message that names the offending config key."""


# Strict scalars: `threshold: abc` or `k: true` is an error, not a silent conversion (an int is a float).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
_SECTION = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------ inputs


def _glob(root: Path, pattern: str) -> list[Path]:
    p = Path(pattern)
    base = p if p.is_absolute() else root / p
    if any(ch in pattern for ch in "*?["):
        anchor = Path(base.anchor)
        rel = base.relative_to(anchor)
        return sorted(anchor.glob(str(rel)))
    return [base] if base.exists() else []


def _arrow_files(paths: list[Path]) -> list[Path]:
    """A `datasets` save_to_disk folder stands for its Arrow files, in the order its state.json lists them
    (data-*.arrow when it has none); Arrow files given directly are themselves."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            out.append(p)
            continue
        state = p / "state.json"
        names: list[str] = []
        if state.exists():
            try:
                names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                names = []
        out.extend([p / n for n in names] if names else sorted(p.glob("*.arrow")))
    return out


@settings(frozen=True, config=_SECTION)
class QuerySource:
    """One query source: a file or glob and where the query text is in each record."""

    name: Str
    path: Str
    format: Literal["jsonl", "json", "tsv", "tsv.gz", "parquet", "arrow"]
    text_field: Str | None = None  # a dotted path; a number indexes a list: conversation.0.content
    text_column: Int = Field(0, ge=0)
    # text_field names a list of chat messages; first_user: the query is the first user turn (the
    # paper's choice); all_user: every user turn is a query of its own
    turn: Literal["first_user", "all_user"] | None = None
    license: Str | None = None  # stated in the exported dataset's card

    def files(self, root: Path) -> list[Path]:
        paths = _glob(root, self.path)
        return _arrow_files(paths) if self.format == "arrow" else paths


@settings(frozen=True, config=_SECTION)
class Corpus:
    """One document corpus: files, format and field mapping; shard_size overrides the project's."""

    name: Str
    path: Str
    format: Literal["jsonl", "text", "parquet", "arrow"]
    text_field: Str = "text"
    id_field: Str | None = None
    title_field: Str | None = None
    metadata: list[Str] = Field(default_factory=list)  # fields carried into the lake: url, language, ...
    shard_size: Int | None = Field(None, ge=1)
    license: Str | None = None  # stated in the exported dataset's card

    def files(self, root: Path) -> list[Path]:
        paths = _glob(root, self.path)
        return _arrow_files(paths) if self.format == "arrow" else paths

    @field_validator("name")
    @classmethod
    def _no_dash(cls, v: str) -> str:
        if "-" in v:
            raise ValueError(f"corpus name {v!r} may not contain '-' (it separates shard numbers)")
        return v


@settings(frozen=True, config=_SECTION)
class TemplateSource:
    """A ready template bank (the released FineTemplates, or one's own) loaded as a `template_bank`
    partition instead of genericizing queries; a preset fills the column names it does not set."""

    name: Str
    path: Str
    format: Literal["parquet", "jsonl"]
    preset: Literal["finetemplates"] | None = None
    template_column: Str | None = None  # default: template
    description_column: Str | None = None  # default: description
    id_column: Str | None = None  # the bank's own template id, kept for lineage
    query_column: Str | None = None  # the query a template came from, when the bank has it
    metadata: list[Str] | None = None  # more columns kept with each template
    license: Str | None = None  # stated in the exported dataset's card

    def files(self, root: Path) -> list[Path]:
        return _glob(root, self.path)

    def column(self, key: str) -> Any:
        """A column setting: the one set here, else the preset's, else the plain default."""
        value = getattr(self, key)
        if value is not None:
            return value
        preset = TEMPLATE_PRESETS.get(self.preset or "", {})
        if key in preset:
            return preset[key]
        return {"template_column": "template", "description_column": "description", "metadata": []}.get(key)


# ------------------------------------------------------------------------------------ stage sections


@settings(frozen=True, config=_SECTION)
class DemoLimits:
    """Limits that apply only at `scale: demo`."""

    queries_per_source: Int | None = Field(None, ge=1)
    docs_per_file: Int | None = Field(None, ge=1)
    files_per_corpus: Int | None = Field(None, ge=1)


@settings(frozen=True, config=_SECTION)
class QueryFilters:
    min_chars: Int = Field(8, ge=0)
    max_chars: Int = Field(1000, ge=1)
    unsafe_patterns: Str | None = None  # None: the shipped list
    eval_sets: list[Str] = Field(default_factory=list)
    ngram: Int = Field(8, ge=1)


@settings(frozen=True, config=_SECTION)
class GenericizeSettings:
    """The genericizer has no settings beyond its model profile entry yet."""


@settings(frozen=True, config=_SECTION)
class MatchingSettings:
    k: Int = Field(5, ge=0)  # local vectors per document (Gaussian pooling)
    sigma: Float = Field(0.05, gt=0)
    min_local_width: Float = Field(16.0, ge=0)  # tokens: a local vector's width is max(sigma * T, this)
    alpha: Float = Field(1.0, ge=0)
    threshold: Float = Field(0.25, ge=-1, le=1)  # calibrated for all-MiniLM-L6-v2
    candidates_per_vector: Int = Field(32, ge=1)
    max_templates: Int = Field(6, ge=1)
    seed: Int = 0
    exact_below: Int = Field(100_000, ge=0)
    index_factory: Str = "auto"
    nprobe: Int = Field(DEFAULT_NPROBE, ge=1)  # 32: the compressed index at 18M needs it (README)
    k_factor: Int = Field(DEFAULT_K_FACTOR, ge=1)  # a re-ranking (compressed) index re-scores k * k_factor
    embed_batch: Int = Field(4096, ge=1)
    train_size: Int = Field(131_072, ge=1)
    target_complexity_sources: list[Str] = Field(default_factory=list)


@settings(frozen=True, config=_SECTION)
class InstantiationSettings:
    window_chars: Int = Field(1200, ge=64)
    min_excerpt_ratio: Float = Field(0.8, ge=0, le=1)
    max_span_chars: Int = Field(4000, ge=1)
    min_answer_words: Int = Field(0, ge=0)
    constrained_excerpts: Bool = True


@settings(frozen=True, config=_SECTION)
class JudgeSettings:
    min_score: Int = Field(4, ge=1, le=5)
    constrained_score: Bool = True
    # (excerpt, instruction, answer, label, reason) rows with a dev and a held-out split: calibrates the
    # relevance gate on dev, and puts the judge's score per label on dev in the judged corpus's metadata
    labelled_set: Str | None = None
    labelled_plot_rows: Int | None = Field(64, ge=1)  # dev rows judged for the plot (None: all of them)


@settings(frozen=True, config=_SECTION)
class GateSettings:
    """Checks before the judge (`gates.py`): a pair failing an enabled one is rejected with its reason
    and never costs a judge call. Accepted = every enabled gate passes and score >= min_score."""

    request: Bool = True
    relevance: Bool = True
    # a cosine, or `calibrated`: the highest one keeping `relevance_keep_good` of the dev split's good pairs
    relevance_threshold: Float | Literal["calibrated"] = "calibrated"
    relevance_keep_good: Float = Field(0.8, gt=0, le=1)
    grounded_fill: Bool = True
    min_grounded_share: Float = Field(0.5, ge=0, le=1)
    names_grounded: Bool = True  # any filled name or number the document lacks fails the gate
    answer_leak: Bool = True
    max_leaked_share: Float = Field(0.5, gt=0, le=1)
    max_leaked_words: Int = Field(5, ge=1)  # the answer's own words (not the template's) the instruction holds
    best_passage: Bool = True
    # how much better (in cosine) another sentence of the document may match the instruction than the answer
    max_passage_gap: Float = Field(0.2, ge=0)
    max_passages: Int = Field(2000, ge=1)  # sentences of one document compared (evenly spaced beyond it)
    complete_answer: Bool = True


@settings(frozen=True, config=_SECTION)
class BudgetSettings:
    """The training corpus's token budget per document (the paper's rollover budget)."""

    rollover: Bool = True
    budget_ratio: Float = Field(1.0, gt=0)


@settings(frozen=True, config=_SECTION)
class TrainingSettings:
    """One fine-tuning run: seeded, checkpointed, resumable; max_steps/time_budget_s bound it."""

    epochs: Int = Field(3, ge=1)
    lr: Float = Field(5e-5, gt=0)
    batch_size: Int = Field(8, ge=1)
    max_tokens: Int = Field(512, ge=8)
    eval_share: Float = Field(0.1, ge=0, lt=1)
    checkpoint_every: Int = Field(50, ge=1)
    max_steps: Int | None = Field(None, ge=1)
    time_budget_s: Float | None = Field(None, gt=0)


@settings(frozen=True, config=_SECTION)
class PretrainingSettings:
    """Continued pre-training of a base causal LM, once on the training corpus (`trained_model`) and once on
    the raw text of the same documents (`baseline_model`), with the same settings and number of tokens."""

    base_model: Str = EMBEDDED_LLM  # the embedded model, a Hugging Face id or a local directory
    seed: Int = 0
    sequence_length: Int = Field(256, ge=16)  # texts are packed, separated by EOS, into blocks this long
    token_budget: Int | None = Field(None, ge=16)  # None: the training corpus's own token count
    batch_size: Int = Field(8, ge=1)
    lr: Float = Field(1e-4, gt=0)
    heldout_documents: Float = Field(0.1, ge=0, lt=1)  # share of documents kept out for held-out loss
    checkpoint_every: Int = Field(50, ge=1)
    time_budget_s: Float | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


@settings(frozen=True, config=_SECTION)
class ComparisonSettings:
    """What `model_comparison` asks the base, baseline and trained models."""

    # Closed-book questions about the trained documents (never a query source: decontamination keeps them
    # out). `document_field` holds the document's own id (the corpus's id_field); `answers_field` a list of
    # gold answers. Without gold answers the reference is the document's sentence that shares most words
    # with the question (its evidence sentence).
    knowledge_questions: Str | None = None
    question_field: Str = "question"
    document_field: Str = "pid"
    answers_field: Str = "answers"
    max_questions: Int = Field(64, ge=1)
    # Real prompts no query source used (prompts a query source read are excluded, and counted).
    instruction_prompts: Str | None = None
    prompt_field: Str = "prompt"
    max_prompts: Int = Field(24, ge=1)
    max_prompt_chars: Int = Field(1500, ge=1)  # longer prompts are counted out (prompt_too_long)
    max_new_tokens: Int = Field(64, ge=1)
    # Every model writes at least this many tokens before it may end: a model trained on raw text ends
    # right after `Answer:` (no training text has an answer there), and silence compares nothing.
    min_new_tokens: Int = Field(8, ge=0)
    batch_size: Int = Field(8, ge=1)
    seed: Int = 0


@settings(frozen=True, config=_SECTION)
class TeacherJudgment:
    matches: Int | None = Field(400, ge=1)
    templates_per_document: Int = Field(5, ge=1)
    compatible_min_score: Int = Field(4, ge=1, le=5)
    incompatible_max_score: Int = Field(2, ge=1, le=5)


@settings(frozen=True, config=_SECTION)
class EmbeddingTraining:
    """The matching embedder's fine-tuning: its labels, base model, held-out set and training run."""

    labels: Literal["labelled_pairs", "teacher_judgment"] = "labelled_pairs"
    base: Str = EMBEDDED_EMBEDDER
    teacher_judgment: TeacherJudgment = Field(default_factory=TeacherJudgment)
    questions: Str | None = None
    paragraphs: Str | None = None
    max_pairs: Int | None = Field(2000, ge=2)
    max_heldout_questions: Int | None = Field(None, ge=1)
    epochs: Int = Field(1, ge=1)
    lr: Float = Field(2e-5, gt=0)
    batch_size: Int = Field(16, ge=1)
    max_tokens: Int = Field(256, ge=8)
    eval_share: Float = Field(0.1, ge=0, lt=1)
    round_two: Bool = True
    checkpoint_every: Int = Field(100, ge=1)
    max_steps: Int | None = Field(None, ge=1)
    time_budget_s: Float | None = Field(None, gt=0)

    def training(self) -> TrainingSettings:
        """The training-run part of the section, in the shape both trainers take."""
        return TrainingSettings(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            eval_share=self.eval_share,
            checkpoint_every=self.checkpoint_every,
            max_steps=self.max_steps,
            time_budget_s=self.time_budget_s,
        )


@settings(frozen=True, config=_SECTION)
class DistillationSettings:
    teacher_profile: Str = "embedded"
    silver_genericizer_queries: Int | None = Field(None, ge=1)
    silver_instantiation_matches: Int | None = Field(None, ge=1)
    student: Str = EMBEDDED_LLM
    seed: Int = 0
    genericizer: TrainingSettings = Field(default_factory=TrainingSettings)
    instantiator: TrainingSettings = Field(default_factory=TrainingSettings)
    embedding: EmbeddingTraining = Field(default_factory=EmbeddingTraining)


# ------------------------------------------------------------------------------------ models


@settings(frozen=True, config=ConfigDict(extra="allow"))
class StageModelSettings:
    """A profile's entry for one LLM stage; keys beyond these are the backend's own options."""

    model: Str
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    max_new_tokens: Int = Field(128, ge=1)
    temperature: Float = Field(0.0, ge=0)
    batch_size: Int = Field(8, ge=1)
    prompt_format: Str | None = None  # None: the stage's default format
    constrained: Bool | None = None  # None: the stage section's constrained_* switch


@settings(frozen=True, config=_SECTION)
class ModelProfile:
    genericize: StageModelSettings
    instantiate: StageModelSettings
    judge: StageModelSettings
    embedder: Str = EMBEDDED_EMBEDDER
    # a number, `calibrated` (written beside a fine-tuned embedder), or None: matching.threshold
    matching_threshold: Float | Literal["calibrated"] | None = None
    # the accept decision for this profile's models: None = the `judge.min_score` / `gates:` sections
    min_score: Int | None = Field(None, ge=1, le=5)
    gates: GateSettings | None = None

    @field_validator("matching_threshold", mode="wrap")
    @classmethod
    def _threshold(cls, v: Any, handler: Any) -> Any:
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(f"must be a number or 'calibrated', not {v!r}") from None


@dataclass(frozen=True)
class ModelSpec:
    """One stage's model as a backend sees it: which backend runs it and how it decodes."""

    backend: str
    model: str
    max_new_tokens: int
    temperature: float = 0.0
    batch_size: int = 8
    prompt_format: str = ""  # "" = the stage's default format
    constrained: bool | None = None  # None = the stage section's constrained_* switch
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific: base_url, concurrency, ...


# ------------------------------------------------------------------------------------ the project


@settings(frozen=True, config=_SECTION)
class ProjectSettings:
    """The whole config file, validated; `Config` adds the paths it resolves to."""

    model_profiles: dict[Str, ModelProfile]
    data_dir: Str = "data"
    scale: Literal["demo", "full"] = "demo"
    demo: DemoLimits = Field(default_factory=DemoLimits)
    shard_size: Int = Field(8, ge=1)
    max_document_chars: Int = Field(5_000_000, ge=1)
    query_sources: list[QuerySource] = Field(default_factory=list)
    template_sources: list[TemplateSource] = Field(default_factory=list)
    corpora: list[Corpus] = Field(default_factory=list)
    query_filters: QueryFilters = Field(default_factory=QueryFilters)
    genericize: GenericizeSettings = Field(default_factory=GenericizeSettings)
    matching: MatchingSettings = Field(default_factory=MatchingSettings)
    instantiation: InstantiationSettings = Field(default_factory=InstantiationSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    gates: GateSettings = Field(default_factory=GateSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    distillation: DistillationSettings = Field(default_factory=DistillationSettings)
    pretraining: PretrainingSettings = Field(default_factory=PretrainingSettings)
    comparison: ComparisonSettings = Field(default_factory=ComparisonSettings)
    model_profile: Str = "embedded"
    model_cache_dir: Str | None = None


@dataclass(frozen=True)
class Config:
    """The validated project: its settings sections, the active profile's models and resolved paths."""

    root: Path
    data_dir: Path
    settings: ProjectSettings
    models: dict[str, ModelSpec]
    embedder: str
    cache_dir: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    # The sections, typed: a stage reads `cfg.matching.k`, never a dotted string with a default.
    @property
    def scale(self) -> str:
        return self.settings.scale

    @property
    def demo(self) -> DemoLimits:
        return self.settings.demo

    @property
    def shard_size(self) -> int:
        return self.settings.shard_size

    @property
    def max_document_chars(self) -> int:
        return self.settings.max_document_chars

    @property
    def query_sources(self) -> list[QuerySource]:
        return self.settings.query_sources

    @property
    def template_sources(self) -> list[TemplateSource]:
        return self.settings.template_sources

    @property
    def source_partitions(self) -> list[str]:
        """The keys of the per-source stages: query sources, then template sources."""
        return [s.name for s in self.query_sources] + [t.name for t in self.template_sources]

    @property
    def corpora(self) -> list[Corpus]:
        return self.settings.corpora

    @property
    def query_filters(self) -> QueryFilters:
        return self.settings.query_filters

    @property
    def matching(self) -> MatchingSettings:
        return self.settings.matching

    @property
    def instantiation(self) -> InstantiationSettings:
        return self.settings.instantiation

    @property
    def judge(self) -> JudgeSettings:
        return self.settings.judge

    @property
    def gates(self) -> GateSettings:
        """The active profile's gates, or the `gates:` section."""
        return self.profile.gates or self.settings.gates

    @property
    def min_score(self) -> int:
        """The active profile's min_score, or `judge.min_score`."""
        value = self.profile.min_score
        return self.judge.min_score if value is None else value

    @property
    def budget(self) -> BudgetSettings:
        return self.settings.budget

    @property
    def distillation(self) -> DistillationSettings:
        return self.settings.distillation

    @property
    def pretraining(self) -> PretrainingSettings:
        return self.settings.pretraining

    @property
    def comparison(self) -> ComparisonSettings:
        return self.settings.comparison

    @property
    def profile_name(self) -> str:
        return self.settings.model_profile

    @property
    def profile(self) -> ModelProfile:
        return self.settings.model_profiles[self.settings.model_profile]

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.duckdb"

    @property
    def request_cache_path(self) -> Path:
        return self.data_dir / "request_cache.sqlite"

    def path(self, relative: str) -> Path:
        """A path of the config, relative to the config file's folder."""
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    def threshold_file(self) -> Path | None:
        """Where a `calibrated` profile's threshold lives: beside its embedder's weights."""
        value = self.profile.matching_threshold
        return Path(self.embedder) / CALIBRATED_THRESHOLD_FILE if value == "calibrated" else None

    def matching_threshold(self) -> float:
        """The profile's threshold, a number or `calibrated` (what the matching_embedding asset measured
        for the embedder it trained); else `matching.threshold`. Similarity scales differ per model."""
        path = self.threshold_file()
        if path is None:
            value = self.profile.matching_threshold
            return float(self.matching.threshold if value is None else value)
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

    def source(self, name: str) -> QuerySource:
        for s in self.query_sources:
            if s.name == name:
                return s
        raise ConfigError(f"query source {name!r} is not in the config (have: {[s.name for s in self.query_sources]})")

    def template_source(self, name: str) -> TemplateSource | None:
        """The template source of this name, or None when the name is a query source's."""
        return next((t for t in self.template_sources if t.name == name), None)

    def corpus(self, name: str) -> Corpus:
        for c in self.corpora:
            if c.name == name:
                return c
        raise ConfigError(f"corpus {name!r} is not in the config (have: {[c.name for c in self.corpora]})")

    def limit(self, key: str) -> int | None:
        """Demo-size limits apply only at `scale: demo`; `scale: full` runs the whole sample."""
        return getattr(self.demo, key) if self.scale == "demo" else None

    def with_profile(self, name: str) -> Config:
        """The same project with another model profile active (the distillation teacher, a comparison)."""
        raw = copy.deepcopy(self.raw)
        raw["model_profile"] = name
        return parse_config(raw, self.root)

    def section(self, path: str) -> Any:
        """A dotted config path; `profile.` stands for the active model profile, `teacher.` for the
        distillation teacher's (`distillation.teacher_profile`). Missing parts read as None."""
        parts = path.split(".")
        node: Any = self.settings
        if parts[0] in ("profile", "teacher"):
            name = self.settings.model_profile if parts[0] == "profile" else self.distillation.teacher_profile
            node = self.settings.model_profiles.get(name)
            parts = parts[1:]
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        return node

    def stage_fingerprint(self, *sections: str) -> str:
        """A hash of the config sections a stage depends on (their values with defaults applied)."""
        blob = json.dumps({s: plain(self.section(s)) for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def extras(entry: Any) -> dict[str, Any]:
    """The keys a settings entry that allows them holds beyond its fields (a backend's options)."""
    names = {f.name for f in dataclasses.fields(entry)}
    return {k: v for k, v in vars(entry).items() if k not in names and not k.startswith("__")}


def plain(value: Any) -> Any:
    """A settings value as plain JSON-able data (dataclasses to dicts), for hashing and reports."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)} | {
            k: plain(v) for k, v in extras(value).items()
        }
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ loading


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping; an error naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return raw


def _with_base(raw: dict[str, Any], path: Path, seen: list[Path]) -> dict[str, Any]:
    """`base: other.yaml` (relative to this file): that file's settings with this one's merged over them,
    so an experiment states only what it changes. Paths stay relative to the file that was loaded."""
    name = raw.pop("base", None)
    if name is None:
        return raw
    if not isinstance(name, str):
        raise ConfigError(f"{path}: base must be the path of another config file, not {name!r}")
    base_path = (path.parent / name).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: base {name!r} leads back to {base_path} (a cycle)")
    if not base_path.exists():
        raise ConfigError(f"{path}: base config {base_path} not found")
    base = _read_mapping(base_path, "base config")
    return _deep_merge(_with_base(base, base_path, [*seen, base_path]), raw)


def default_config_path() -> Path:
    env = os.environ.get("FI_CONFIG")
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_CONFIG_NAME


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    path = Path(path) if path else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file not found: {path} (set FI_CONFIG or pass --config)")
    raw = _with_base(_read_mapping(path, "config file"), path, [path.resolve()])
    raw = _deep_merge(raw, overrides or {})
    if os.environ.get("FI_SCALE"):
        raw["scale"] = os.environ["FI_SCALE"]
    if os.environ.get("FI_DATA_DIR"):
        raw["data_dir"] = os.environ["FI_DATA_DIR"]
    try:
        return parse_config(raw, root=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def expand_model_path(model: str, root: Path, data_dir: Path) -> str:
    """`{data_dir}` and `{root}` in a model path, so a profile can name models the project trains."""
    return model.replace("{data_dir}", str(data_dir)).replace("{root}", str(root))


_PROJECT = TypeAdapter(ProjectSettings)


def _renamed_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """Old spellings still load, with a message: `training:` is now `budget:` (the token budget)."""
    if "training" not in raw:
        return raw
    if "budget" in raw:
        raise ConfigError("training: this is the old name of budget, and both are set; keep only budget")
    log.warning("config: the section 'training' is now called 'budget' (the training corpus's token budget)")
    raw = dict(raw)
    raw["budget"] = raw.pop("training")
    return raw


def parse_config(raw: dict[str, Any], root: Path) -> Config:
    raw = _renamed_sections(raw)
    try:
        s = _PROJECT.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, raw)) from None
    _check_project(s)
    data_dir = Path(s.data_dir)
    data_dir = data_dir if data_dir.is_absolute() else root / data_dir
    profile = s.model_profiles[s.model_profile]
    models = {stage: _model_spec(stage, getattr(profile, stage), root, data_dir) for stage in LLM_STAGES}
    cache_dir = Path(
        os.environ.get("FI_MODEL_CACHE")
        or s.model_cache_dir
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fineinstructions"
    )
    return Config(
        root=root,
        data_dir=data_dir,
        settings=s,
        models=models,
        embedder=expand_model_path(profile.embedder, root, data_dir),
        cache_dir=cache_dir,
        raw=raw,
    )


def _check_project(s: ProjectSettings) -> None:
    """Rules across keys, each naming the keys involved."""
    for i, src in enumerate(s.query_sources):
        if src.format in ("jsonl", "json") and not src.text_field:
            raise ConfigError(f"query_sources[{i}].text_field: format {src.format} needs text_field")
        if src.format in ("parquet", "arrow") and not src.text_field:
            raise ConfigError(f"query_sources[{i}].text_field: format {src.format} needs text_field (a column)")
        if src.turn and src.format not in ("jsonl", "json", "parquet", "arrow"):
            raise ConfigError(f"query_sources[{i}].turn: format {src.format} has no chat messages to choose from")
        if src.turn and not src.text_field:
            raise ConfigError(f"query_sources[{i}].turn: needs text_field, the list of messages (e.g. conversation)")
    for i, c in enumerate(s.corpora):
        if c.format == "text" and c.metadata:
            raise ConfigError(f"corpora[{i}].metadata: format text has no fields to carry")
    names = [x.name for x in s.query_sources] + [t.name for t in s.template_sources] + [c.name for c in s.corpora]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"query_sources/template_sources/corpora: names must be unique, {dup} appear twice")
    if s.model_profile not in s.model_profiles:
        hint = _suggest(s.model_profile, s.model_profiles)
        raise ConfigError(
            f"model_profile: {s.model_profile!r} is not defined under model_profiles{hint}"
            f" (have: {sorted(s.model_profiles)})"
        )
    if s.distillation.teacher_profile not in s.model_profiles:
        raise ConfigError(
            f"distillation.teacher_profile: {s.distillation.teacher_profile!r} is not defined under model_profiles"
            f"{_suggest(s.distillation.teacher_profile, s.model_profiles)} (have: {sorted(s.model_profiles)})"
        )
    tj = s.distillation.embedding.teacher_judgment
    if tj.incompatible_max_score >= tj.compatible_min_score:
        raise ConfigError(
            "distillation.embedding.teacher_judgment: incompatible_max_score "
            f"({tj.incompatible_max_score}) must be below compatible_min_score ({tj.compatible_min_score})"
        )
    for name, profile in s.model_profiles.items():
        for stage in LLM_STAGES:
            where = f"model_profiles.{name}.{stage}"
            entry: StageModelSettings = getattr(profile, stage)
            fmt = entry.prompt_format or PROMPT_FORMATS[stage][0]
            if fmt not in PROMPT_FORMATS[stage]:
                raise ConfigError(f"{where}.prompt_format {fmt!r} is not one of {PROMPT_FORMATS[stage]}")
            allowed = BACKEND_OPTIONS[entry.backend]
            known = [f.name for f in dataclasses.fields(StageModelSettings)]
            for key in extras(entry):
                hint = _suggest(key, known + list(allowed or ()))
                if allowed is None and not hint:
                    continue  # a vLLM engine argument
                if allowed is None or key not in allowed:
                    raise ConfigError(
                        f"{where}.{key}: unknown key for the {entry.backend} backend{hint}"
                        + (f" (its options: {', '.join(allowed) or 'none'})" if allowed is not None else "")
                    )
            decode = extras(entry).get("decode", "continuous") if entry.backend == "transformers" else None
            if decode is not None and decode not in TRANSFORMERS_DECODE_PATHS:
                raise ConfigError(f"{where}.decode: {decode!r} is not one of {TRANSFORMERS_DECODE_PATHS}")


def _model_spec(stage: str, entry: StageModelSettings, root: Path, data_dir: Path) -> ModelSpec:
    return ModelSpec(
        backend=entry.backend,
        model=expand_model_path(entry.model, root, data_dir),
        max_new_tokens=entry.max_new_tokens,
        temperature=entry.temperature,
        batch_size=entry.batch_size,
        prompt_format=entry.prompt_format or PROMPT_FORMATS[stage][0],
        constrained=entry.constrained,
        options=extras(entry),
    )


# ------------------------------------------------------------------------------------ error messages


def _suggest(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(tp: Any) -> list[Any]:
    """The concrete types an annotation allows (Optional, unions and Annotated unwrapped)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _field_types(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _field_types(a)]
    return [tp]


def _type_at(loc: tuple[Any, ...]) -> Any:
    """The settings class or container type at an error location, walking from ProjectSettings."""
    tp: Any = ProjectSettings
    for part in loc:
        nxt = None
        for t in _field_types(tp):
            origin = typing.get_origin(t)
            if dataclasses.is_dataclass(t) and isinstance(part, str):
                hints = typing.get_type_hints(t, include_extras=True)
                nxt = hints.get(part)
            elif origin is list and isinstance(part, int):
                nxt = typing.get_args(t)[0]
            elif origin is dict:
                nxt = typing.get_args(t)[1]
            if nxt is not None:
                break
        if nxt is None:
            return None
        tp = nxt
    return tp


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _expected(tp: Any) -> str:
    names = []
    for t in _field_types(tp):
        if typing.get_origin(t) is Literal:
            names.append("one of " + ", ".join(repr(a) for a in typing.get_args(t)))
        elif t is type(None):
            names.append("null")
        elif dataclasses.is_dataclass(t):
            names.append("a mapping")
        else:
            names.append(_KIND.get(t, getattr(t, "__name__", str(t))))
    return " or ".join(names)


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def describe_errors(exc: ValidationError, raw: dict[str, Any]) -> str:
    """Every problem of a config, one line each: the dotted key, the value and what was expected."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = _dotted(loc)
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parent = _type_at(loc[:-1])
            fields = [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
            known = f"; known: {', '.join(fields)}" if fields else ""
            lines.append(f"{key}: unknown key{_suggest(loc[-1], fields)}{known}")
        elif err["type"] == "missing" or err["type"] == "missing_argument":
            lines.append(f"{key}: missing required key")
        elif err["type"] == "literal_error":
            choices = ", ".join(repr(c) for t in _field_types(_type_at(loc)) for c in typing.get_args(t))
            lines.append(f"{key} must be one of {choices}, not {err['input']!r}")
        elif err["type"] == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key} {msg}" if msg.startswith("must") else f"{key}: {msg}")
        elif err["type"].endswith(("_type", "_parsing")):
            lines.append(f"{key}: expected {_expected(_type_at(loc)) or err['msg']}, got {err['input']!r}")
        else:
            lines.append(f"{key}: {err['input']!r} is not valid: {err['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines) if len(lines) > 1 else "invalid config: " + lines[0]
