"""The stage registry: every stage of the method declared once, with everything derived from it.

A `StageSpec` names a stage, its partitioning (per query source, per corpus shard, or none), the
stages upstream of it, the config sections it reads, the function that computes it and its output
contract. The Dagster assets with their checks and partitions, the jobs, the sensor's targets, the
CLI's run order and staleness, the catalog's views, the partition signatures and `fineinstructions
stats` are all derived from `REGISTRY`: adding a stage is one spec here plus its function and tests.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distill, distill_stages, stages, training_stages
from .config import Config, plain
from .shards import get_shard
from .stage_base import StageContext, StageResult


class Partitioning(enum.Enum):
    """How a stage's output is split: the names are the Dagster partition sets'."""

    QUERY_SOURCE = "query_sources"
    CORPUS_SHARD = "corpus_shards"
    NONE = "unpartitioned"


@dataclass(frozen=True)
class Contract:
    """What a stage's output promises: checked on every materialization."""

    id_column: str
    required: tuple[str, ...]
    unit: str  # what rows_in and rows_out count
    min_yield: float  # out/in below this is a warning


@dataclass(frozen=True)
class Inputs:
    """What a partition depends on beyond its upstream lake files and static config sections:
    config values that depend on the partition or on other settings, files outside the lake, and
    (where it differs from the upstream stages) the lake stages actually read."""

    values: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    reads: tuple[str, ...] | None = None


InputsFn = Callable[[Config, str], Inputs]


@dataclass(frozen=True)
class StageSpec:
    name: str
    partitioning: Partitioning
    upstream: tuple[str, ...]
    config: tuple[str, ...]  # dotted config sections (`profile.` = the active model profile)
    compute: Callable[[StageContext], StageResult]
    contract: Contract
    group: str
    description: str
    pool: str | None = None  # a Dagster concurrency pool: llm, training
    reads: tuple[str, ...] = ()  # lake stages read beyond `upstream` (not graph edges)
    side_files: tuple[str, ...] = ()  # files beside the output that downstream stages read (index.faiss)
    inputs: InputsFn | None = None
    default_run: bool = True  # False: only on request (the distillation loop retrains models)
    # True: rerun on a changed input only once the user opts in to that automation (retraining costs minutes).
    opt_in_automation: bool = False

    @property
    def automated(self) -> bool:
        """Rerun by Dagster's automation when an input changes: default-run stages after a chain's first
        (the partition sensor starts those)."""
        return self.default_run and bool(self.upstream)

    @property
    def partitioned(self) -> bool:
        return self.partitioning is not Partitioning.NONE

    def dependencies(self, cfg: Config, partition: str) -> Inputs:
        """The config values, outside files and lake stages this partition's output depends on."""
        extra = self.inputs(cfg, partition) if self.inputs else Inputs()
        values = {s: plain(cfg.section(s)) for s in self.config} | extra.values
        reads = extra.reads if extra.reads is not None else self.upstream + self.reads
        return Inputs(values=values, files=extra.files, reads=reads)


class RegistryError(ValueError):
    """A registry that names an unknown stage, repeats one, or is not in dependency order."""


class Registry:
    """Stage specs in dependency order (each after its upstream), looked up by name."""

    def __init__(self, specs: Iterable[StageSpec]):
        self._specs: dict[str, StageSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise RegistryError(f"stage {spec.name!r} is declared twice")
            for up in spec.upstream + spec.reads:
                if up not in self._specs:
                    raise RegistryError(f"stage {spec.name!r} reads {up!r}, which is not declared before it")
            self._specs[spec.name] = spec

    def __iter__(self) -> Iterator[StageSpec]:
        return iter(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, name: str) -> StageSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no stage {name!r} in the registry (have: {', '.join(self._specs)})") from None

    def names(self) -> list[str]:
        return list(self._specs)

    def with_stage(self, spec: StageSpec) -> Registry:
        """A registry with one more stage (appended: its upstream must already be declared)."""
        return Registry([*self._specs.values(), spec])

    def partitioned_by(self, partitioning: Partitioning, default_run: bool | None = True) -> list[str]:
        return [
            s.name
            for s in self
            if s.partitioning is partitioning and (default_run is None or s.default_run == default_run)
        ]

    def downstream(self, name: str) -> list[str]:
        """Every stage that depends on `name`, directly or not, in registry order."""
        found: set[str] = {name}
        out = []
        for spec in self:
            if set(spec.upstream) & found:
                found.add(spec.name)
                out.append(spec.name)
        return out

    def ancestors(self, name: str) -> list[str]:
        """Every stage `name` depends on, directly or not (graph edges only), in registry order."""
        found = set(self[name].upstream)
        for spec in reversed(list(self)):
            if spec.name in found:
                found |= set(spec.upstream)
        return [s for s in self.names() if s in found]

    def run_segments(self, include_on_demand: bool = False) -> list[tuple[Partitioning, list[str]]]:
        """The order a full run takes: consecutive stages of one partitioning form a chain run per
        partition (one Dagster run each); every unpartitioned stage is its own step, so a stage that
        comes out unchanged spares what follows it."""
        segments: list[tuple[Partitioning, list[str]]] = []
        for spec in self:
            if not (spec.default_run or include_on_demand):
                continue
            last = segments[-1] if segments else None
            if spec.partitioned and last and last[0] is spec.partitioning:
                last[1].append(spec.name)
            else:
                segments.append((spec.partitioning, [spec.name]))
        return segments


# ------------------------------------------------------------------------------------ stage inputs


def _source_inputs(cfg: Config, partition: str) -> Inputs:
    if cfg.template_source(partition) is not None:
        return Inputs(values={"template_source": partition})  # no queries to read
    source = cfg.source(partition)
    return Inputs(values={"source": plain(source)}, files=tuple(source.files(cfg.root)))


def _template_source_inputs(cfg: Config, partition: str) -> Inputs:
    """A template source's bank files and column mapping; a query source adds nothing."""
    source = cfg.template_source(partition)
    if source is None:
        return Inputs()
    return Inputs(values={"template_source": plain(source)}, files=tuple(source.files(cfg.root)))


def _query_filter_inputs(cfg: Config, partition: str) -> Inputs:
    f = cfg.query_filters
    files = [cfg.path(p) for p in f.eval_sets] + ([cfg.path(f.unsafe_patterns)] if f.unsafe_patterns else [])
    return Inputs(files=tuple(files))


def _shard_inputs(cfg: Config, partition: str) -> Inputs:
    shard = get_shard(cfg, partition)
    segments = [f"{seg.file}:{seg.start}:{seg.stop}" for seg in shard.segments]
    return Inputs(
        values={"corpus": plain(cfg.corpus(shard.corpus)), "segments": segments},
        files=tuple(cfg.root / seg.file for seg in shard.segments),
    )


def _threshold_inputs(cfg: Config, partition: str) -> Inputs:
    path = cfg.threshold_file()
    return Inputs(files=(path,) if path is not None else ())


def _labelled_set_inputs(cfg: Config, partition: str) -> Inputs:
    """The labelled judge set calibrates the relevance gate and is judged for the score plot."""
    path = cfg.judge.labelled_set
    return Inputs(files=(cfg.path(path),) if path else ())


def _baseline_inputs(cfg: Config, partition: str) -> Inputs:
    """The baseline reads the documents the training corpus names; their ids are content ids (corpus,
    key, text), so the corpus alone decides its input and a new shard whose pairs were all rejected
    leaves it fresh."""
    return Inputs(reads=("training_corpus",))


def _comparison_inputs(cfg: Config, partition: str) -> Inputs:
    """The question and prompt files; the queries the sources read (their prompts are excluded); the
    trained documents, as the training corpus names them (see `_baseline_inputs`)."""
    c = cfg.comparison
    return Inputs(
        files=tuple(cfg.path(p) for p in (c.knowledge_questions, c.instruction_prompts) if p),
        reads=("trained_model", "baseline_model", "training_corpus", "raw_queries"),
    )


def _seed_file(name: str) -> InputsFn:
    def inputs(cfg: Config, partition: str) -> Inputs:
        return Inputs(files=(distill.SEEDS_DIR / name,))

    return inputs


def _embedding_inputs(cfg: Config, partition: str) -> Inputs:
    """The embedding settings; the teacher's judgment, and what it judged, only when it labels."""
    e = plain(cfg.distillation.embedding)
    judged = e["labels"] == "teacher_judgment"
    if not judged:
        e.pop("teacher_judgment")
    files = tuple(cfg.path(str(e.get(k) or "")) for k in ("questions", "paragraphs"))
    if not judged:
        return Inputs(values={"distillation.embedding": e}, files=files, reads=())
    sections = ("distillation.teacher_profile", "teacher.judge", "judge", "instantiation.window_chars")
    return Inputs(
        values={"distillation.embedding": e} | {s: plain(cfg.section(s)) for s in sections},
        files=files,
        reads=("template_index", "template_matches", "documents"),
    )


# ------------------------------------------------------------------------------------ the stages

Q, S, N = Partitioning.QUERY_SOURCE, Partitioning.CORPUS_SHARD, Partitioning.NONE
_MODEL_COLUMNS = ("model_id", "model_dir", "eval_loss_before", "eval_loss_after")

STAGES = (
    StageSpec(
        "raw_queries",
        Q,
        (),
        ("scale", "demo"),
        stages.raw_queries,
        Contract("query_id", ("query_id", "source", "text"), "records", 0.5),
        "queries",
        "Queries read from one source in its own format; unreadable records kept as rejections.",
        inputs=_source_inputs,
    ),
    StageSpec(
        "query_set",
        Q,
        ("raw_queries",),
        ("query_filters",),
        stages.query_set,
        Contract("query_id", ("query_id", "source", "query"), "queries", 0.3),
        "queries",
        "Normalized, deduplicated, length-bounded, unsafe-filtered, decontaminated queries.",
        inputs=_query_filter_inputs,
    ),
    StageSpec(
        "template_bank",
        Q,
        ("query_set",),
        ("profile.genericize", "genericize"),
        stages.template_bank,
        Contract("template_id", ("template_id", "query_id", "template", "description", "complexity"), "queries", 0.1),
        "queries",
        "LLM-genericized templates with <fi> tags and compatible document descriptions, or a template "
        "source's ready bank, validated the same way.",
        pool="llm",
        inputs=_template_source_inputs,
    ),
    StageSpec(
        "template_index",
        N,
        ("template_bank",),
        (
            "matching.exact_below",
            "matching.index_factory",
            "matching.nprobe",
            "matching.train_size",
            "profile.embedder",
        ),
        stages.template_index,
        Contract("template_id", ("template_id", "description", "index_row"), "templates", 0.5),
        "matching",
        "Description embeddings of every valid template and a FAISS index over them.",
        side_files=("index.faiss",),
    ),
    StageSpec(
        "documents",
        S,
        (),
        ("max_document_chars",),
        stages.documents,
        Contract("document_id", ("document_id", "corpus", "text"), "records", 0.5),
        "corpus",
        "One shard of a corpus; unreadable, empty or oversized documents kept as rejections.",
        inputs=_shard_inputs,
    ),
    StageSpec(
        "document_index",
        S,
        ("documents",),
        ("matching.k", "matching.sigma", "matching.min_local_width", "matching.alpha", "profile.embedder"),
        stages.document_index,
        Contract("document_id", ("document_id", "vectors", "n_tokens"), "documents", 0.99),
        "corpus",
        "K+1 Gaussian-pooled vectors per document over its whole token sequence.",
    ),
    StageSpec(
        "template_matches",
        S,
        ("document_index", "template_index"),
        ("matching", "profile.matching_threshold"),
        stages.template_matches,
        Contract("match_id", ("match_id", "document_id", "template_id", "similarity", "chunk"), "documents", 0.2),
        "matching",
        "Up to max_templates complexity-weighted templates per document above the similarity threshold.",
        inputs=_threshold_inputs,
    ),
    StageSpec(
        "instruction_pairs",
        S,
        ("template_matches",),
        ("instantiation", "profile.instantiate"),
        stages.instruction_pairs,
        Contract("pair_id", ("pair_id", "instruction", "answer", "excerpt_spans", "excerpt_ratio"), "matches", 0.05),
        "generation",
        "Instantiated instruction/answer pairs with excerpts expanded against the document.",
        pool="llm",
        reads=("documents", "template_index"),
    ),
    StageSpec(
        "judged_corpus",
        S,
        ("instruction_pairs",),
        ("judge", "gates", "profile.judge", "profile.min_score", "profile.gates", "profile.embedder"),
        stages.judged_corpus,
        Contract("pair_id", ("pair_id", "score", "feedback", "accepted", "relevance"), "pairs", 0.05),
        "generation",
        "Pairs that pass every enabled gate (a request, relevant, grounded, not leaked, complete) and that "
        "the judge scored >= min_score (Flow Judge format, 1..5 rubric).",
        pool="llm",
        reads=("documents", "template_index"),
        inputs=_labelled_set_inputs,
    ),
    StageSpec(
        "training_corpus",
        N,
        ("judged_corpus",),
        ("budget", "profile.embedder"),
        stages.training_corpus,
        Contract("pair_id", ("pair_id", "text", "tokens"), "pairs", 0.3),
        "training",
        "Token-budgeted 'Instruction: ...\\n\\nAnswer: ...' texts, exported as Parquet and JSONL.",
        reads=("document_index",),
    ),
    # The controlled comparison (the paper's claim): the same base, settings and number of tokens, trained
    # on the judged pairs and on the raw text of their documents, then asked the same questions.
    StageSpec(
        "trained_model",
        N,
        ("training_corpus",),
        ("pretraining",),
        training_stages.trained_model,
        Contract("model_id", training_stages.MODEL_COLUMNS, "pairs", 0.9),
        "training",
        "The base LM continued-pretrained on the training corpus's texts, packed, loss on every token "
        "(tokens seen, loss curves, tokens/s).",
        pool="training",
        opt_in_automation=True,
    ),
    StageSpec(
        "baseline_model",
        N,
        ("training_corpus",),
        ("pretraining",),
        training_stages.baseline_model,
        Contract("model_id", training_stages.MODEL_COLUMNS, "documents", 0.9),
        "training",
        "The control: the same base, settings and number of tokens on the raw text of the documents the "
        "pairs came from.",
        pool="training",
        reads=("documents",),
        inputs=_baseline_inputs,
        opt_in_automation=True,
    ),
    StageSpec(
        "model_comparison",
        N,
        ("trained_model", "baseline_model"),
        ("comparison", "pretraining", "judge.constrained_score", "profile.judge"),
        training_stages.model_comparison,
        Contract("model_id", training_stages.COMPARISON_COLUMNS, "items", 0.3),
        "training",
        "Base vs baseline vs trained: closed-book questions about the trained documents (answer "
        "log-likelihood, F1, EM) and judged answers to prompts no query source used (score, win rate).",
        pool="llm",
        reads=("training_corpus", "documents", "raw_queries"),
        inputs=_comparison_inputs,
        opt_in_automation=True,
    ),
    # The distillation loop's settings are the teacher profile's, never the active one's (its inputs,
    # query_set and template_matches, are what the pipeline made).
    StageSpec(
        "silver_genericizer_examples",
        N,
        ("query_set",),
        (
            "distillation.teacher_profile",
            "distillation.seed",
            "distillation.silver_genericizer_queries",
            "teacher.genericize",
            "genericize",
        ),
        distill_stages.silver_genericizer_examples,
        Contract("example_id", ("example_id", "query", "template", "description", "provenance"), "examples", 0.5),
        "distillation",
        "Seed + teacher-written genericizer examples that pass the validator, each with its provenance.",
        pool="llm",
        inputs=_seed_file("genericizer.jsonl"),
        default_run=False,
    ),
    StageSpec(
        "genericizer_model",
        N,
        ("silver_genericizer_examples",),
        ("distillation.student", "distillation.seed", "distillation.genericizer"),
        distill_stages.genericizer_model,
        Contract("model_id", _MODEL_COLUMNS, "examples", 0.9),
        "distillation",
        "The student genericizer: the embedded model fine-tuned on the genericizer examples "
        "(loss curve, held-out loss).",
        pool="training",
        default_run=False,
    ),
    StageSpec(
        "silver_instantiation_examples",
        N,
        ("template_matches", "template_index"),
        (
            "distillation.teacher_profile",
            "distillation.seed",
            "distillation.silver_instantiation_matches",
            "teacher.instantiate",
            "instantiation",
        ),
        distill_stages.silver_instantiation_examples,
        Contract(
            "example_id",
            ("example_id", "template", "document", "instruction", "answer", "provenance"),
            "examples",
            0.2,
        ),
        "distillation",
        "Seed + teacher-written instantiation examples that pass the excerpt rules, each with its provenance.",
        pool="llm",
        reads=("documents",),
        inputs=_seed_file("instantiation.jsonl"),
        default_run=False,
    ),
    StageSpec(
        "instantiator_model",
        N,
        ("silver_instantiation_examples",),
        ("distillation.student", "distillation.seed", "distillation.instantiator", "instantiation.window_chars"),
        distill_stages.instantiator_model,
        Contract("model_id", _MODEL_COLUMNS, "examples", 0.9),
        "distillation",
        "The student instantiator: the embedded model fine-tuned on the instantiation examples.",
        pool="training",
        default_run=False,
    ),
    StageSpec(
        "matching_embedding",
        N,
        ("template_matches", "template_index"),
        (
            "distillation.seed",
            "matching.k",
            "matching.sigma",
            "matching.min_local_width",
            "matching.alpha",
            "matching.threshold",
        ),
        distill_stages.matching_embedding,
        # teacher judgment leaves its uncertain middle (score 3) out as a matter of course
        Contract("model_id", _MODEL_COLUMNS, "examples", 0.5),
        "distillation",
        "The embedder fine-tuned twice with a cosine-similarity loss, on labelled (question, paragraph) pairs or "
        "on the teacher's compatibility judgment of template matches; recall@10 on held-out articles.",
        pool="training",
        inputs=_embedding_inputs,
        default_run=False,
    ),
)

REGISTRY = Registry(STAGES)
