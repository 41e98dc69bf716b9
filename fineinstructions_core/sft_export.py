"""The training corpus as a chat/SFT dataset a trainer takes as it is: a Hugging Face dataset folder.

`data/train-00000-of-00001.parquet` holds a `messages` column (one user turn, one assistant turn),
`instruction`, `answer`, the judge's `score` and the lineage ids; `README.md` is its dataset card, with
the configuration and models that made it, rows per stage and rejections by reason, and the source
corpora and query sources with their licenses. `datasets.load_dataset(folder)` loads it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .config import Config
from .io.files import replace_dir

LINEAGE = ("pair_id", "match_id", "document_id", "template_id", "corpus")
DATA_FILE = "data/train-00000-of-00001.parquet"


def sft_rows(corpus: pd.DataFrame) -> pd.DataFrame:
    """One chat example per kept pair: messages, instruction, answer, score and the lineage ids."""
    cols = [c for c in LINEAGE if c in corpus.columns]
    out = pd.DataFrame(
        {
            "messages": [
                [{"role": "user", "content": i}, {"role": "assistant", "content": a}]
                for i, a in zip(corpus.get("instruction", []), corpus.get("answer", []), strict=True)
            ],
            "instruction": corpus.get("instruction", pd.Series(dtype=str)).tolist(),
            "answer": corpus.get("answer", pd.Series(dtype=str)).tolist(),
            "score": corpus.get("score", pd.Series(dtype="Int64")).tolist(),
        }
    )
    for c in cols:
        out[c] = corpus[c].tolist()
    return out


def _stats_table(stages: dict[str, Any]) -> str:
    lines = ["| stage | unit | in | out | rejected | rejections by reason |", "|---|---|---|---|---|---|"]
    for name, s in stages.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "-"
        lines.append(f"| {name} | {s['unit']} | {s['rows_in']} | {s['rows_out']} | {s['rows_rejected']} | {reasons} |")
    return "\n".join(lines)


def dataset_card(cfg: Config, rows: int, stages: dict[str, Any]) -> str:
    """The card: what made the data and what the data is, in the Hugging Face card format."""
    licenses = sorted(
        {s.license for s in [*cfg.corpora, *cfg.settings.query_sources, *cfg.settings.template_sources] if s.license}
    )
    models = "\n".join(
        f"| {stage} | {spec.backend} | `{spec.model}` | {spec.max_new_tokens} | {spec.temperature} |"
        for stage, spec in cfg.models.items()
    )
    corpora = "\n".join(f"| {c.name} | `{c.path}` | {c.format} | {c.license or 'not stated'} |" for c in cfg.corpora)
    sources = "\n".join(
        f"| {s.name} | `{s.path}` | {s.format} | {s.license or 'not stated'} |"
        for s in [*cfg.settings.query_sources, *cfg.settings.template_sources]
    )
    return f"""---
license: {"other" if licenses else "unknown"}
task_categories:
- text-generation
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---

# FineInstructions training corpus

{rows} instruction/answer pairs grounded in documents: each instruction comes from a real user query
genericized into a template, matched to a document and instantiated against it; each answer quotes the
document; each pair was judged (1-5, Flow Judge format) and kept at score >= {cfg.judge.min_score}.

Columns: `messages` (a user turn and an assistant turn), `instruction`, `answer`, `score` (the judge's),
and the lineage ids `{"`, `".join(LINEAGE)}`. The pipeline's DuckDB catalog (`catalog.duckdb`, view
`lineage`) traces each `pair_id` to its query, template and document.

## Configuration

Model profile `{cfg.profile_name}`, embedder `{cfg.embedder}`, matching threshold
{cfg.matching.threshold}, token budget per document {cfg.budget.budget_ratio} x the document's tokens
(rollover {str(cfg.budget.rollover).lower()}), scale `{cfg.scale}`.

| stage | backend | model | max new tokens | temperature |
|---|---|---|---|---|
{models}

## Rows per stage

{_stats_table(stages)}

## Source corpora

| corpus | path | format | license |
|---|---|---|---|
{corpora}

## Query and template sources

| source | path | format | license |
|---|---|---|---|
{sources}

The pairs quote their documents: they carry the documents' licenses ({", ".join(licenses) or "not stated"}).
"""


def write_sft_dataset(corpus: pd.DataFrame, target: Path, card: str) -> Path:
    """Write the folder whole into a temporary sibling and swap it in, so a reader never sees half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".sft-"))
    try:
        (tmp / "data").mkdir()
        sft_rows(corpus).to_parquet(tmp / DATA_FILE, index=False)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
