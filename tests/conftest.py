"""Shared fixtures: a tiny project (config + data) in a temporary folder, built from the shipped sample."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One converted copy of the embedded LLM for the whole test session (and across sessions).
os.environ.setdefault("FI_MODEL_CACHE", str(Path.home() / ".cache" / "fineinstructions-tests"))


def record(fault: str, outcome: str) -> None:
    """One row of the README's reliability table (the fault or bad input tried, and what happened),
    appended to the file FI_FAULT_REPORT names; `scripts/reliability_report.py` prints the table."""
    report = os.environ.get("FI_FAULT_REPORT")
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        with open(report, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fault": fault, "outcome": outcome}) + "\n")


def gates_off() -> dict[str, bool]:
    """Every gate of `GateSettings` switched off, including any added later."""
    from fineinstructions_core.config import GateSettings

    defaults = GateSettings()
    return {name: False for name in GateSettings.__dataclass_fields__ if getattr(defaults, name) is True}


def _head_jsonl(src: Path, dst: Path, n: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)


def squad_project(root: Path, paragraphs: int, **overrides: object) -> tuple[Path, dict]:
    """The real config over the first `paragraphs` shipped SQuAD paragraphs (corpus `wiki`, shards of 3),
    top-level keys in `overrides` replaced; the caller edits the returned dict, then `write_config`."""
    _head_jsonl(SAMPLE / "documents" / "squad_v2_half_paragraphs.jsonl", root / "d" / "wiki.jsonl", paragraphs)
    base = yaml.safe_load((ROOT / "fineinstructions.yaml").read_text())
    wiki = {"name": "wiki", "path": "d/wiki.jsonl", "format": "jsonl", "id_field": "pid", "text_field": "text"}
    base.update(data_dir="data", scale="full", shard_size=3, corpora=[wiki])
    base.update(overrides)
    base["model_profiles"]["embedded"]["judge"]["max_new_tokens"] = 40
    return root / "fineinstructions.yaml", base


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def make_tiny_project(root: Path, queries: int = 6, docs: int = 2) -> Path:
    """A self-contained project: 2 query sources, 2 corpora (one of them a long book), the real config."""
    (root / "q").mkdir(parents=True, exist_ok=True)
    _head_jsonl(SAMPLE / "queries" / "NQ-open.efficientqa.dev.1.1.jsonl", root / "q" / "nq.jsonl", queries)
    lines = [ln for ln in (SAMPLE / "queries" / "query_wellformedness" / "dev.tsv").read_text().splitlines()][:queries]
    (root / "q" / "wf.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _head_jsonl(SAMPLE / "documents" / "debian-handbook.jsonl", root / "d" / "debian.jsonl", docs)
    (root / "d" / "books").mkdir(parents=True, exist_ok=True)
    book = (SAMPLE / "documents" / "gutenberg" / "11-0.txt").read_text(encoding="utf-8")
    (root / "d" / "books" / "alice.txt").write_text(book[:60_000], encoding="utf-8")
    (root / "eval.jsonl").write_text(json.dumps({"question": "what is the capital city of the united kingdom"}) + "\n")
    base = yaml.safe_load((ROOT / "fineinstructions.yaml").read_text())
    base.update(
        data_dir="data",
        scale="full",
        shard_size=2,
        query_sources=[
            {"name": "nq", "path": "q/nq.jsonl", "format": "jsonl", "text_field": "question"},
            {"name": "wf", "path": "q/wf.tsv", "format": "tsv", "text_column": 0},
        ],
        corpora=[
            {
                "name": "debian",
                "path": "d/debian.jsonl",
                "format": "jsonl",
                "id_field": "id",
                "text_field": "text",
                "title_field": "title",
            },
            {"name": "books", "path": "d/books/*.txt", "format": "text", "shard_size": 1},
        ],
    )
    base["query_filters"]["eval_sets"] = ["eval.jsonl"]
    base["matching"]["target_complexity_sources"] = ["nq"]
    base["matching"]["threshold"] = 0.0  # every document gets templates, so later stages always have work
    # No labelled judge set (its dev split would be judged for the plot), and no gates, so the 135M models'
    # pairs on these few documents still reach the judge and the training assets; the gates' own
    # rejections are tested in test_gates.py and test_judged_corpus_gates.py.
    base["judge"]["labelled_set"] = None
    base["gates"] = gates_off()
    # The training assets at their smallest: short blocks (a tiny corpus fills few) and a few questions.
    base["pretraining"].update(sequence_length=32, batch_size=4)
    base["comparison"].update(
        knowledge_questions=str(SAMPLE / "eval" / "squad_v2_half_questions.jsonl"),
        instruction_prompts=str(SAMPLE / "queries" / "arena_hard_v0.1.jsonl"),
        max_questions=2,
        max_prompts=2,
        max_new_tokens=12,
    )
    for stage in ("genericize", "instantiate", "judge"):
        base["model_profiles"]["embedded"][stage]["max_new_tokens"] = {
            "genericize": 64,
            "instantiate": 96,
            "judge": 40,
        }[stage]
    path = root / "fineinstructions.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return make_tiny_project(tmp_path)


@pytest.fixture
def dagster_home(tmp_path: Path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


def cache_rows(data: Path) -> dict[str, float]:
    """The request cache of a data directory: key -> when its answer was stored (a regenerated answer
    gets a new time)."""
    path = data / "request_cache.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path, timeout=60) as db:
        return dict(db.execute("SELECT key, created FROM responses").fetchall())


def accounting_balanced(data: Path) -> bool:
    """Every stage accounting record of the data directory's lake balances (and there is at least one)."""
    records = [json.loads(p.read_text()) for p in (data / "lake" / "_accounting").glob("*/*.json")]
    return bool(records) and all(r["balanced"] for r in records)
