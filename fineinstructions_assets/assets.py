"""The method's stages as software-defined assets, one per stage spec of the registry.

Each asset reads its inputs from the Parquet lake, runs its stage, writes its partition, and reports
row counts, the stage funnel, a preview and its checks. Checks are emitted from inside the asset:
the blocking ones (ids, schema, accounting) fail the step and stop downstream work. Nothing here
names a stage: the graph, partitions, pools and contracts all come from `fineinstructions_core.registry`.
"""

import os
import re
import socket
import sys
import warnings
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    PartitionsDefinition,
    PreviewWarning,
    TableColumn,
    TableColumnConstraints,
    TableRecord,
    TableSchema,
    asset,
)

from fineinstructions_core.codesig import code_signature
from fineinstructions_core.io.catalog import refresh_catalog
from fineinstructions_core.io.lake import UNPARTITIONED
from fineinstructions_core.plan import run_stage
from fineinstructions_core.plots import bars_svg, svg_markdown
from fineinstructions_core.registry import REGISTRY, Contract, Partitioning, Registry, StageSpec
from fineinstructions_core.stage_base import StageResult

from .partitions import PARTITIONS, active_partitions
from .resources import FineInstructionsResource

# Partitioned check specs are a Dagster preview feature (1.13); they are what records each shard's check
# result under its partition, so the warning that says "preview" is expected rather than shown per load.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning)

MARKDOWN_EXTRAS = ("loss_curve", "comparison_table", "comparison_plot", "dataset_card", "labelled_scores_plot")


CHECKS = {
    "ids_unique_not_null": (True, "Every row has a non-null, unique id."),
    "schema": (True, "The required columns are present."),
    "accounting": (True, "Rows in = rows out + rows rejected (every reject kept with a reason)."),
    "yield": (False, "Share of input rows that came out; a warning below the stage's floor."),
}


def check_specs(name: str, partitions_def: PartitionsDefinition | None = None) -> list[AssetCheckSpec]:
    """The four checks of a stage, blocking or not. They share the asset's partitions, so each result is
    recorded for the partition that produced it and the UI shows every shard's status on its own (an
    unpartitioned check would take the latest result of any shard as the asset's)."""
    key = AssetKey(name)
    return [
        AssetCheckSpec(check, asset=key, blocking=blocking, description=text, partitions_def=partitions_def)
        for check, (blocking, text) in CHECKS.items()
    ]


def _checks(name: str, result: StageResult, registry: Registry = REGISTRY) -> list[AssetCheckResult]:
    contract: Contract = registry[name].contract
    id_col, required, floor = contract.id_column, contract.required, contract.min_yield
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
    context: AssetExecutionContext,
    name: str,
    result: StageResult,
    fi: FineInstructionsResource,
    registry: Registry,
) -> MaterializeResult:
    cfg = fi.load()
    refresh_catalog(cfg.catalog_path, cfg.lake_dir, registry.names())
    acc = result.accounting
    funnel = {"in": acc.rows_in, "out": acc.rows_out, **{f"rejected: {k}": v for k, v in acc.rejected.items()}}
    metadata: dict[str, Any] = {
        "dagster/row_count": MetadataValue.int(len(result.output)),
        "dagster/column_schema": _column_schema(result.output, registry[name].contract),
        "unit": acc.unit,
        "funnel": _table(funnel, "step", "rows"),
        "funnel_plot": MetadataValue.md(svg_markdown(bars_svg(list(funnel.items())), alt="funnel")),
        "preview": MetadataValue.md(_preview(result.output)),
        "rejections_preview": MetadataValue.md(_preview(result.rejections)),
        "lake_path": MetadataValue.path(str(cfg.lake_dir / name / f"{result.partition}.parquet")),
        "signature": acc.extra.get("signature", ""),
        "seconds": acc.extra.get("seconds", 0.0),
        "executed_by": executed_by(),
    }
    if result.llm:
        metadata["llm"] = MetadataValue.json(result.llm)
        for k in ("cache_hits", "cache_misses", "errors", "prompt_tokens", "completion_tokens"):
            metadata[f"llm_{k}"] = MetadataValue.int(int(result.llm.get(k) or 0))
    for k, v in result.extra.items():
        if k in MARKDOWN_EXTRAS:
            metadata[k] = MetadataValue.md(v)  # a table or an SVG plot, rendered in the asset's metadata
        elif k != "llm" and v is not None:
            metadata[k] = MetadataValue.json(v) if isinstance(v, dict | list) else v
    if "similarity" in result.output.columns and len(result.output):
        counts = result.output["similarity"].round(1).value_counts().sort_index()
        bins = [(f"{b:.1f}", int(c)) for b, c in counts.items()]
        metadata["similarity_histogram"] = MetadataValue.md(svg_markdown(bars_svg(bins), alt="similarity"))
    context.log.info(f"{name}[{result.partition}]: {funnel}")
    return MaterializeResult(metadata=metadata, check_results=_checks(name, result, registry))


def executed_by() -> str:
    """The process that ran the step, shown in its materialization so a distributed run tells which worker
    did what: the Dask worker's name when a Dask worker runs it (`distributed` is then already loaded),
    and always host and pid."""
    where = f"{socket.gethostname()} pid {os.getpid()}"
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            return f"dask worker {distributed.get_worker().name} on {where}"
        except ValueError:  # loaded, but this is not a Dask worker's task
            pass
    return where


def _table(counts: dict[str, int], key: str, value: str) -> MetadataValue:
    """Counts as a table the UI renders (rather than JSON text)."""
    schema = TableSchema(columns=[TableColumn(key, "string"), TableColumn(value, "int")])
    return MetadataValue.table([TableRecord({key: k, value: int(v)}) for k, v in counts.items()], schema=schema)


def _column_schema(df: pd.DataFrame, contract: Contract) -> TableSchema:
    """The output's columns with their types; the contract's required ones say so, its id is unique."""
    columns = []
    for col in df.columns:
        required = col in contract.required
        columns.append(
            TableColumn(
                str(col),
                str(df[col].dtype),
                description="required by the stage's output contract" if required else None,
                constraints=TableColumnConstraints(
                    nullable=col != contract.id_column, unique=col == contract.id_column
                ),
            )
        )
    return TableSchema(columns=columns)


def _partitions_def(partitioning: Partitioning) -> PartitionsDefinition | None:
    return PARTITIONS.get(partitioning)


def stage_asset(spec: StageSpec, registry: Registry = REGISTRY) -> AssetsDefinition:
    """The Dagster asset of one stage spec: partitions, deps, pool, checks and group from the spec."""

    partitions_def = _partitions_def(spec.partitioning)

    @asset(
        name=spec.name,
        partitions_def=partitions_def,
        deps=list(spec.upstream),
        group_name=spec.group,
        check_specs=check_specs(spec.name, partitions_def),
        description=spec.description,
        pool=spec.pool,
        kinds={"parquet", "python"},
        code_version=code_version(spec),
        tags=_tags(spec),
        owners=asset_owners(),
        automation_condition=automation_condition(spec),
    )
    def _asset(context: AssetExecutionContext, fi: FineInstructionsResource) -> MaterializeResult:
        cfg = fi.load()
        partition = context.partition_key if context.has_partition_key else UNPARTITIONED
        sources, shards = active_partitions(cfg, context.instance)
        result = run_stage(cfg, spec.name, partition, sources, shards, logger=context.log.info, registry=registry)
        return _report(context, spec.name, result, fi, registry)

    return _asset


def automation_condition(spec: StageSpec) -> AutomationCondition | None:
    """When Dagster's automation sensor reruns a stage: an input partition was updated since the stage
    last ran or was requested, no input is missing or still running or failed a blocking check (its
    materialization is recorded before the check fails its step), and the stage itself is not running.

    Not `eager()`: a new partition's chain is launched whole, in one run, by the partition sensor, so
    a newly missing partition is no trigger here (the two sensors would race to launch it); everything
    after it (the template index, every shard's matches when the index changed, the training corpus)
    follows from its updates. On-request stages have none, nor have the chains' first stages (that
    sensor starts them)."""
    if not spec.automated:
        return None
    return (
        AutomationCondition.any_deps_updated().since_last_handled()
        & AutomationCondition.all_deps_blocking_checks_passed()
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    ).with_label("an input changed")


def code_version(spec: StageSpec) -> str:
    """The stage's code signature (its function and the project code it reaches), so the UI's "code
    version changed" marks exactly what `fineinstructions run` would rerun for a code edit."""
    return code_signature(spec.compute)[:16]


def _tags(spec: StageSpec) -> dict[str, str]:
    """Tags to filter the asset graph by: the partitioning, the concurrency pool, and whether the stage
    runs only on request (the distillation loop retrains models; select `run:on_request` to leave it out)."""
    tags = {"partitioning": spec.partitioning.value, "run": "default" if spec.default_run else "on_request"}
    if spec.pool:
        tags["pool"] = spec.pool
    return tags


def asset_owners(env: dict[str, str] | None = None) -> list[str]:
    """Who owns the assets, as the UI shows and filters by: FI_OWNERS, comma-separated e-mail addresses
    or `team:<name>`s, set where the code location runs (none by default)."""
    raw = (os.environ if env is None else env).get("FI_OWNERS", "")
    owners = [o.strip() for o in raw.split(",") if o.strip()]
    for owner in owners:
        team = owner.startswith("team:") and len(owner) > len("team:")
        if not team and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", owner):
            raise ValueError(f"FI_OWNERS: {owner!r} is neither an e-mail address nor team:<name>")
    return owners


def build_assets(registry: Registry = REGISTRY) -> list[AssetsDefinition]:
    return [stage_asset(spec, registry) for spec in registry]


ALL_ASSETS = build_assets()
ASSETS_BY_NAME = {a.key.to_user_string(): a for a in ALL_ASSETS}


def __getattr__(name: str) -> AssetsDefinition:
    """`from fineinstructions_assets.assets import judged_corpus`: each stage's asset by its name."""
    try:
        return ASSETS_BY_NAME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
