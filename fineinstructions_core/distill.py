"""The distillation loop (paper stages 1, 2 and 4): seed and silver examples, students fine-tuned on them.

A teacher (any model profile) writes silver genericizer and instantiator examples; the project's own
validators keep the good ones; the project's hand-written seeds join them, each row with its
provenance. Students are small causal LMs fine-tuned on the `fineinstructions` prompt format (the bare
input framing of the released models), so a student is a drop-in model for that format.

Held-out data never used for training: `HELDOUT_ARTICLES` (SQuAD articles, for matching and
instantiation) and `heldout_queries` (query rows outside every range the seeds and the demo read).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import genericize, instantiate
from .templates import check_template

SEEDS_DIR = Path(__file__).resolve().parent / "seeds"

# SQuAD articles kept out of every training set: the matching and instantiation evaluations use them.
HELDOUT_ARTICLES = (
    "Victoria (Australia)",
    "Intergovernmental Panel on Climate Change",
    "Geology",
    "Fresno, California",
    "Civil disobedience",
    "Amazon rainforest",
)

GENERICIZER_COLUMNS = ["example_id", "source", "query", "template", "description", "provenance"]
INSTANTIATION_COLUMNS = [
    "example_id",
    "corpus",
    "document_id",
    "template",
    "document",
    "instruction",
    "answer",
    "provenance",
]


def example_id(*parts: object) -> str:
    from .ids import content_id

    return content_id("ex", *[json.dumps(p, ensure_ascii=False) for p in parts])


def load_genericizer_seeds(path: Path | None = None) -> pd.DataFrame:
    rows = [json.loads(line) for line in open(path or SEEDS_DIR / "genericizer.jsonl", encoding="utf-8")]
    df = pd.DataFrame(
        {
            "source": [r["source"] for r in rows],
            "query": [r["query"] for r in rows],
            "template": [r["template"] for r in rows],
            "description": [r["compatible_document_description"] for r in rows],
        }
    )
    df.insert(0, "example_id", [example_id("g", q, t) for q, t in zip(df["query"], df["template"], strict=True)])
    return df.assign(provenance="seed")[GENERICIZER_COLUMNS]


def load_instantiation_seeds(path: Path | None = None) -> pd.DataFrame:
    rows = [json.loads(line) for line in open(path or SEEDS_DIR / "instantiation.jsonl", encoding="utf-8")]
    df = pd.DataFrame(rows, columns=[c for c in INSTANTIATION_COLUMNS if c not in ("example_id", "provenance")])
    df.insert(0, "example_id", [example_id("i", d, t) for d, t in zip(df["document_id"], df["template"], strict=True)])
    return df.assign(provenance="seed")[INSTANTIATION_COLUMNS]


# ------------------------------------------------------------------------------------ targets + checks


def genericizer_target(template: str, description: str) -> str:
    """What the student writes: the released genericizer's JSON object."""
    return json.dumps({"template": template, "compatible_document_description": description}, ensure_ascii=False)


def instantiation_target(instruction: str | None, answer: str | None) -> str:
    """What the student writes, in the form the excerpt grammar steers (it starts with `Instruction:`)."""
    if instruction is None or answer is None or (isinstance(instruction, float) and np.isnan(instruction)):
        return "Instruction: null"
    return f"Instruction: {instruction}\nAnswer: {answer}"


def check_genericizer_examples(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, rejected with `reason`) under the genericizer validator the pipeline uses."""
    verdicts = [check_template(t, d, q) for t, d, q in zip(df["template"], df["description"], df["query"], strict=True)]
    ok = np.array([v.ok for v in verdicts], dtype=bool)
    rejected = df[~ok].assign(reason=[v.reason for v in verdicts if not v.ok])
    return df[ok].reset_index(drop=True), rejected.reset_index(drop=True)


def check_instantiation_examples(
    df: pd.DataFrame, min_excerpt_ratio: float = 0.8, max_span_chars: int = 4000, min_answer_words: int = 6
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, rejected with `reason`): a pair must pass the pipeline's excerpt rules; a `null` stays a
    `null` (the student must learn to refuse a template that does not fit)."""
    keep, reasons = [], []
    for row in df.itertuples(index=False):
        target = instantiation_target(row.instruction, row.answer)
        check = instantiate.check_instantiation(
            row.template, row.document, target, 0, min_excerpt_ratio, max_span_chars, min_answer_words
        )
        good = check.status == "ok" or (check.status == "null_incompatible" and target.endswith("null"))
        keep.append(good)
        if not good:
            reasons.append(check.status)
    mask = np.array(keep, dtype=bool)
    return df[mask].reset_index(drop=True), df[~mask].assign(reason=reasons).reset_index(drop=True)


# ------------------------------------------------------------------------------------ training examples


def genericizer_sft_examples(df: pd.DataFrame) -> list[tuple[list[dict[str, str]], str]]:
    """(chat messages of the `fineinstructions` prompt, target text) pairs."""
    out = []
    for row in df.itertuples(index=False):
        req = genericize.build_request(row.query, "student", 0, 0.0, "fineinstructions")
        out.append((req.messages_json(), genericizer_target(row.template, row.description)))
    return out


def instantiation_sft_examples(df: pd.DataFrame, window_chars: int = 1200) -> list[tuple[list[dict[str, str]], str]]:
    out = []
    for row in df.itertuples(index=False):
        _, window = instantiate.document_window(row.document, 0, window_chars)
        req = instantiate.build_request(row.template, window, "student", 0, 0.0, False, "fineinstructions")
        out.append((req.messages_json(), instantiation_target(row.instruction, row.answer)))
    return out


# ------------------------------------------------------------------------------------ held-out data


def heldout_queries(root: Path, per_source: int = 20) -> pd.DataFrame:
    """Real queries from the shipped sample that neither the seeds nor the demo's query set read:
    rows from 200 on of the configured files (the demo reads the first 40; seeds come from other files)."""
    from .config import QuerySource
    from .io.readers import Record, read_query_source

    sample = root / "sample_data" / "queries"
    sources = [
        QuerySource("nq_open", str(sample / "NQ-open.efficientqa.dev.1.1.jsonl"), "jsonl", text_field="question"),
        QuerySource("wellformedness", str(sample / "query_wellformedness" / "dev.tsv"), "tsv", text_column=0),
        QuerySource(
            "cqadupstack",
            str(sample / "cqadupstack" / "topics.beir-v1.0.0-cqadupstack-unix.test.tsv.gz"),
            "tsv.gz",
            text_column=1,
        ),
        QuerySource("webquestions", str(sample / "webquestions" / "val.json"), "json", text_field="qText"),
        QuerySource("arena_hard", str(sample / "arena_hard_v0.1.jsonl"), "jsonl", text_field="prompt"),
    ]
    seeds = set(load_genericizer_seeds()["query"])
    rows = []
    for src in sources:
        if not src.files(root):  # a project without the shipped sample has no such held-out set
            continue
        records = [it for it in read_query_source(src, root) if isinstance(it, Record)]
        items = [it for it in records if it.text.strip() and it.text not in seeds][200:]
        items = [it for it in items if len(it.text) <= 300][:per_source]
        rows += [{"source": src.name, "query": it.text} for it in items]
    return pd.DataFrame(rows, columns=["source", "query"])


def heldout_paragraphs(paragraphs_path: Path, n: int = 30, min_chars: int = 300, max_chars: int = 1200) -> pd.DataFrame:
    """Paragraphs of the held-out SQuAD articles, spread over the articles."""
    rows = [json.loads(line) for line in open(paragraphs_path, encoding="utf-8")]
    rows = [r for r in rows if r.get("title") in HELDOUT_ARTICLES and min_chars <= len(r["text"]) <= max_chars]
    by_title: dict[str, list[dict]] = {}
    for r in rows:
        by_title.setdefault(r["title"], []).append(r)
    picked: list[dict] = []
    while len(picked) < n and any(by_title.values()):
        for title in list(by_title):
            if by_title[title] and len(picked) < n:
                picked.append(by_title[title].pop(0))
    return pd.DataFrame(
        {
            "document_id": [r["pid"] for r in picked],
            "title": [r["title"] for r in picked],
            "text": [r["text"] for r in picked],
        }
    )
