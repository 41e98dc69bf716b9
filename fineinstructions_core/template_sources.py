"""A ready template bank (the released FineTemplates, or one's own) as a `template_bank` partition.

Its rows bypass the genericizer but not its rules: each template goes through the same validation a
genericized one does (`templates.check_template`), and every row that fails, or cannot be read, is a
rejection with its reason. Each kept template keeps its lineage: the bank's file and row, and the
bank's own template id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .config import TemplateSource
from .ids import content_id
from .io.readers import Rejected, TemplateRow, read_template_source
from .templates import check_template

COLUMNS = [
    "template_id",
    "query_id",
    "source",
    "query",
    "template",
    "description",
    "variables",
    "complexity",
    "file",
    "record",
    "bank_template_id",
    "metadata",
]
REJECTION_COLUMNS = ["source", "file", "record", "bank_template_id", "template", "reason", "detail"]


def load_template_source(source: TemplateSource, root: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(template_bank rows, rejections, rows read) for one template source."""
    kept, rejected = [], []
    seen: dict[str, str] = {}
    rows_in = 0
    for item in read_template_source(source, root):
        rows_in += 1
        if isinstance(item, Rejected):
            rejected.append(
                {
                    "source": source.name,
                    "file": item.file,
                    "record": item.index,
                    "bank_template_id": None,
                    "template": item.snippet,
                    "reason": item.reason,
                    "detail": item.detail,
                }
            )
            continue
        row = _validated(source.name, item)
        if isinstance(row, dict) and row["template_id"] in seen:
            row = (
                "duplicate_template",
                f"same template and description as {seen[row['template_id']]}",
            )
        if isinstance(row, tuple):
            rejected.append(
                {
                    "source": source.name,
                    "file": item.file,
                    "record": item.index,
                    "bank_template_id": item.bank_id,
                    "template": item.template[:500],
                    "reason": row[0],
                    "detail": row[1],
                }
            )
            continue
        seen[row["template_id"]] = f"{item.file} row {item.index}"
        kept.append(row)
    return pd.DataFrame(kept, columns=COLUMNS), pd.DataFrame(rejected, columns=REJECTION_COLUMNS), rows_in


def _validated(source: str, item: TemplateRow) -> dict | tuple[str, str]:
    """The template_bank row of one bank row, or (reason, detail) when the validator rejects it."""
    template, description = item.template.strip(), item.description.strip()
    check = check_template(template, description, item.query or "")
    if not check.ok:
        return str(check.reason), template[:200]
    return {
        "template_id": content_id("tpl", template, description),
        "query_id": content_id("q", source, item.file, item.index, template),
        "source": source,
        "query": item.query or "",
        "template": template,
        "description": description,
        "variables": list(check.variables),
        "complexity": check.complexity,
        "file": item.file,
        "record": item.index,
        "bank_template_id": item.bank_id,
        "metadata": None if item.metadata is None else json.dumps(item.metadata, default=str, ensure_ascii=False),
    }
