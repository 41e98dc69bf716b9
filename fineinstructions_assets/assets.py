"""The method's stages as software-defined assets: thin wrappers over `fineinstructions_core.stages`.

Each asset reads its inputs from the Parquet lake, runs its stage, writes its partition, and reports
row counts, the stage funnel, a preview and its checks. Checks are emitted from inside the asset:
the blocking ones (ids, schema, accounting) fail the step and stop downstream work.
"""

from typing import Any

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    asset,
)

from fineinstructions_core.io.catalog import refresh_catalog
from fineinstructions_core.io.lake import UNPARTITIONED
from fineinstructions_core.stages import StageResult, run_stage

from .partitions import active_partitions, corpus_shards, query_sources
from .resources import FineInstructionsResource

# asset -> (id column, required columns, minimum healthy yield out/in)
CONTRACTS: dict[str, tuple[str, list[str], float]] = {
    "raw_queries": ("query_id", ["query_id", "source", "text"], 0.5),
    "query_set": ("query_id", ["query_id", "source", "query"], 0.3),
    "template_bank": ("template_id", ["template_id", "query_id", "template", "description", "complexity"], 0.1),
    "template_index": ("template_id", ["template_id", "description", "index_row"], 0.5),
    "documents": ("document_id", ["document_id", "corpus", "text"], 0.5),
    "document_index": ("document_id", ["document_id", "vectors", "n_tokens"], 0.99),
    "template_matches": ("match_id", ["match_id", "document_id", "template_id", "similarity", "chunk"], 0.2),
    "instruction_pairs": ("pair_id", ["pair_id", "instruction", "answer", "excerpt_spans", "excerpt_ratio"], 0.05),
    "judged_corpus": ("pair_id", ["pair_id", "score", "feedback", "accepted"], 0.05),
    "training_corpus": ("pair_id", ["pair_id", "text", "tokens"], 0.3),
    "silver_genericizer_examples": (
        "example_id",
        ["example_id", "query", "template", "description", "provenance"],
        0.5,
    ),
    "silver_instantiation_examples": (
        "example_id",
        ["example_id", "template", "document", "instruction", "answer", "provenance"],
        0.2,
    ),
    "genericizer_model": ("model_id", ["model_id", "model_dir", "eval_loss_before", "eval_loss_after"], 0.9),
    "instantiator_model": ("model_id", ["model_id", "model_dir", "eval_loss_before", "eval_loss_after"], 0.9),
    # teacher judgment leaves its uncertain middle (score 3) out as a matter of course
    "matching_embedding": ("model_id", ["model_id", "model_dir", "eval_loss_before", "eval_loss_after"], 0.5),
}


def check_specs(name: str) -> list[AssetCheckSpec]:
    key = AssetKey(name)
    return [
        AssetCheckSpec(
            "ids_unique_not_null", asset=key, blocking=True, description="Every row has a non-null, unique id."
        ),
        AssetCheckSpec("schema", asset=key, blocking=True, description="The required columns are present."),
        AssetCheckSpec(
            "accounting",
            asset=key,
            blocking=True,
            description="Rows in = rows out + rows rejected (every reject kept with a reason).",
        ),
        AssetCheckSpec(
            "yield",
            asset=key,
            blocking=False,
            description="Share of input rows that came out; a warning below the stage's floor.",
        ),
    ]


def _checks(name: str, result: StageResult) -> list[AssetCheckResult]:
    id_col, required, floor = CONTRACTS[name]
    out, acc = result.output, result.accounting
    missing = [c for c in required if c not in out.columns]
    ids = out[id_col] if id_col in out.columns else pd.Series(dtype=object)
    nulls, dups = int(ids.isna().sum()), int(ids.duplicated().sum())
    share = acc.rows_out / acc.rows_in if acc.rows_in else 1.0
    return [
        AssetCheckResult(
            check_name="ids_unique_not_null",
            passed=nulls == 0 and dups == 0 and id_col in out.columns,
            metadata={"null_ids": nulls, "duplicate_ids": dups},
        ),
        AssetCheckResult(
            check_name="schema",
            passed=not missing,
            metadata={"missing_columns": ", ".join(missing) or "none", "columns": ", ".join(map(str, out.columns))},
        ),
        AssetCheckResult(
            check_name="accounting",
            passed=acc.balanced,
            metadata={
                "unit": acc.unit,
                "rows_in": acc.rows_in,
                "rows_out": acc.rows_out,
                "rows_rejected": acc.rows_rejected,
            },
        ),
        AssetCheckResult(
            check_name="yield",
            passed=share >= floor,
            severity=AssetCheckSeverity.WARN,
            metadata={"yield": round(share, 4), "floor": floor},
        ),
    ]


def _preview(df: pd.DataFrame, n: int = 8) -> str:
    if df.empty:
        return "(no rows)"
    cols = [c for c in df.columns if c not in ("vectors", "raw_output", "text")][:8]
    view = df[cols].head(n).copy()
    for c in view.columns:
        view[c] = view[c].map(lambda v: (str(v)[:80] + "…") if len(str(v)) > 80 else str(v))
    return view.to_markdown(index=False)


def _report(
    context: AssetExecutionContext, name: str, result: StageResult, fi: FineInstructionsResource
) -> MaterializeResult:
    cfg = fi.load()
    refresh_catalog(cfg.catalog_path, cfg.lake_dir)
    acc = result.accounting
    funnel = {"in": acc.rows_in, "out": acc.rows_out, **{f"rejected: {k}": v for k, v in acc.rejected.items()}}
    metadata: dict[str, Any] = {
        "row_count": MetadataValue.int(len(result.output)),
        "unit": acc.unit,
        "funnel": MetadataValue.json(funnel),
        "preview": MetadataValue.md(_preview(result.output)),
        "rejections_preview": MetadataValue.md(_preview(result.rejections)),
        "lake_path": MetadataValue.path(str(cfg.lake_dir / name / f"{result.partition}.parquet")),
        "signature": acc.extra.get("signature", ""),
        "seconds": acc.extra.get("seconds", 0.0),
    }
    if result.llm:
        metadata["llm"] = MetadataValue.json(result.llm)
        for k in ("cache_hits", "cache_misses", "errors", "prompt_tokens", "completion_tokens"):
            metadata[f"llm_{k}"] = MetadataValue.int(int(result.llm.get(k) or 0))
    for k, v in result.extra.items():
        if k == "loss_curve":
            metadata[k] = MetadataValue.md(v)  # an SVG plot, rendered in the asset's metadata
        elif k != "llm" and v is not None:
            metadata[k] = MetadataValue.json(v) if isinstance(v, dict | list) else v
    if "similarity" in result.output.columns and len(result.output):
        metadata["similarity_histogram"] = MetadataValue.json(
            result.output["similarity"].round(1).value_counts().sort_index().to_dict()
        )
    context.log.info(f"{name}[{result.partition}]: {funnel}")
    return MaterializeResult(metadata=metadata, check_results=_checks(name, result))


def _run(context: AssetExecutionContext, name: str, fi: FineInstructionsResource) -> MaterializeResult:
    cfg = fi.load()
    partition = context.partition_key if context.has_partition_key else UNPARTITIONED
    sources, shards = active_partitions(cfg, context.instance)
    result = run_stage(cfg, name, partition, sources, shards, logger=context.log.info)
    return _report(context, name, result, fi)


def _partitioned(name: str, partitions_def, deps: list[str], group: str, description: str, pool: str | None = None):
    @asset(
        name=name,
        partitions_def=partitions_def,
        deps=deps,
        group_name=group,
        check_specs=check_specs(name),
        description=description,
        pool=pool,
        kinds={"parquet", "python"},
    )
    def _asset(context: AssetExecutionContext, fi: FineInstructionsResource) -> MaterializeResult:
        return _run(context, name, fi)

    return _asset


raw_queries = _partitioned(
    "raw_queries",
    query_sources,
    [],
    "queries",
    "Queries read from one source in its own format; unreadable records kept as rejections.",
)
query_set = _partitioned(
    "query_set",
    query_sources,
    ["raw_queries"],
    "queries",
    "Normalized, deduplicated, length-bounded, unsafe-filtered, decontaminated queries.",
)
template_bank = _partitioned(
    "template_bank",
    query_sources,
    ["query_set"],
    "queries",
    "LLM-genericized templates with <fi> tags and compatible document descriptions.",
    pool="llm",
)
template_index = _partitioned(
    "template_index",
    None,
    ["template_bank"],
    "matching",
    "Description embeddings of every valid template and a FAISS index over them.",
)
documents = _partitioned(
    "documents",
    corpus_shards,
    [],
    "corpus",
    "One shard of a corpus; unreadable, empty or oversized documents kept as rejections.",
)
document_index = _partitioned(
    "document_index",
    corpus_shards,
    ["documents"],
    "corpus",
    "K+1 Gaussian-pooled vectors per document over its whole token sequence.",
)
template_matches = _partitioned(
    "template_matches",
    corpus_shards,
    ["document_index", "template_index"],
    "matching",
    "Up to 6 complexity-weighted templates per document above the similarity threshold.",
)
instruction_pairs = _partitioned(
    "instruction_pairs",
    corpus_shards,
    ["template_matches"],
    "generation",
    "Instantiated instruction/answer pairs with excerpts expanded against the document.",
    pool="llm",
)
judged_corpus = _partitioned(
    "judged_corpus",
    corpus_shards,
    ["instruction_pairs"],
    "generation",
    "Pairs the judge scored >= 4 (Flow Judge format, 1..5 rubric).",
    pool="llm",
)
training_corpus = _partitioned(
    "training_corpus",
    None,
    ["judged_corpus"],
    "training",
    "Token-budgeted 'Instruction: ...\\n\\nAnswer: ...' texts, exported as Parquet and JSONL.",
)

silver_genericizer_examples = _partitioned(
    "silver_genericizer_examples",
    None,
    ["query_set"],
    "distillation",
    "Seed + teacher-written genericizer examples that pass the validator, each with its provenance.",
    pool="llm",
)
silver_instantiation_examples = _partitioned(
    "silver_instantiation_examples",
    None,
    ["template_matches", "template_index"],
    "distillation",
    "Seed + teacher-written instantiation examples that pass the excerpt rules, each with its provenance.",
    pool="llm",
)
genericizer_model = _partitioned(
    "genericizer_model",
    None,
    ["silver_genericizer_examples"],
    "distillation",
    "The student genericizer: the embedded model fine-tuned on the genericizer examples (loss curve, held-out loss).",
    pool="training",
)
instantiator_model = _partitioned(
    "instantiator_model",
    None,
    ["silver_instantiation_examples"],
    "distillation",
    "The student instantiator: the embedded model fine-tuned on the instantiation examples.",
    pool="training",
)
matching_embedding = _partitioned(
    "matching_embedding",
    None,
    ["template_matches", "template_index"],
    "distillation",
    "The embedder fine-tuned twice with a cosine-similarity loss, on labelled (question, paragraph) pairs or "
    "on the teacher's compatibility judgment of template matches; recall@10 on held-out articles.",
    pool="training",
)

DISTILLATION_ASSETS = [
    silver_genericizer_examples,
    genericizer_model,
    silver_instantiation_examples,
    instantiator_model,
    matching_embedding,
]

ALL_ASSETS = [
    raw_queries,
    query_set,
    template_bank,
    template_index,
    documents,
    document_index,
    template_matches,
    instruction_pairs,
    judged_corpus,
    training_corpus,
    *DISTILLATION_ASSETS,
]
