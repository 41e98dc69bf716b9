"""The held-out comparison of two profiles' genericizer and instantiator (`fineinstructions eval-students`).

An evaluation harness, not a stage: it writes nothing to the lake and is not part of the graph.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from . import distill, genericize, instantiate, judge
from .config import Config
from .embed import Embedder
from .llm_requests import genericize_requests, instantiation_request, judge_request
from .stage_base import Logger, ProgressReporter, llm_for

log = logging.getLogger(__name__)


def _genericizer_report(cfg: Config, name: str, queries: pd.DataFrame, logger: Logger) -> dict[str, Any]:
    """Share of held-out queries whose genericization passes the pipeline's own parser and validator."""
    reqs = genericize_requests(cfg, queries["query"])
    results = llm_for(cfg, "genericize").generate(reqs, progress=ProgressReporter(f"{name} genericize", logger))
    kept, _ = genericize.genericize_results(queries.assign(query_id=queries.index.astype(str)), results)
    passed = queries.index.astype(str).isin(kept["query_id"])
    by_source = queries.assign(ok=passed).groupby("source")["ok"].mean().round(3).to_dict()
    return {
        "model": cfg.models["genericize"].model,
        "queries": len(queries),
        "valid_share": round(float(np.mean(passed)), 3) if len(passed) else 0.0,
        "valid_share_by_source": by_source,
    }


def _instantiator_report(
    cfg: Config, judge_cfg: Config, name: str, pairs: pd.DataFrame, logger: Logger
) -> dict[str, Any]:
    """Share of (paragraph, template) pairs whose instantiation passes the excerpt rules, and the share
    that also scores >= min_score under `judge_cfg`'s judge."""
    ins = cfg.instantiation
    windows = [instantiate.document_window(t, 0, ins.window_chars)[1] for t in pairs["text"]]
    reqs = [instantiation_request(cfg, t, w) for t, w in zip(pairs["template"], windows, strict=True)]
    results = llm_for(cfg, "instantiate").generate(reqs, progress=ProgressReporter(f"{name} instantiate", logger))
    checks = [
        instantiate.check_instantiation(
            t, w, r.text if not r.error else "", 0, ins.min_excerpt_ratio, ins.max_span_chars, ins.min_answer_words
        )
        for t, w, r in zip(pairs["template"], windows, results, strict=True)
    ]
    ok = [c for c in checks if c.status == "ok" and c.parsed is not None and c.expansion is not None]
    jreqs = [judge_request(judge_cfg, c.parsed.instruction, c.expansion.text) for c in ok]
    scores = [judge.parse_output(r.text) for r in llm_for(judge_cfg, "judge").generate(jreqs)] if jreqs else []
    accepted = sum(1 for sc in scores if sc and sc[0] >= judge_cfg.judge.min_score)
    statuses = pd.Series([c.status for c in checks]).value_counts().to_dict()
    return {
        "model": cfg.models["instantiate"].model,
        "pairs": len(pairs),
        "excerpt_rule_share": round(len(ok) / len(pairs), 3) if len(pairs) else 0.0,
        "excerpt_rule_and_judge_share": round(accepted / len(pairs), 3) if len(pairs) else 0.0,
        "status_counts": {str(k): int(v) for k, v in statuses.items()},
    }


def heldout_pairs(cfg: Config, paragraphs: int) -> pd.DataFrame:
    """Held-out SQuAD paragraphs, each with its best-matching seed template (the same pairs for both sides)."""
    docs = distill.heldout_paragraphs(cfg.path(cfg.distillation.embedding.paragraphs or ""), paragraphs)
    bank = distill.load_genericizer_seeds().drop_duplicates("template")
    emb = Embedder(cfg.embedder)
    sims = emb.embed_texts(list(docs["text"])) @ emb.embed_texts(list(bank["description"])).T
    return docs.assign(template=[bank["template"].iloc[int(np.argmax(s))] for s in sims])


def compare_students(
    baseline: Config,
    student: Config,
    queries_per_source: int = 20,
    paragraphs: int = 30,
    logger: Logger = log.info,
) -> dict[str, Any]:
    """Held-out comparison of two profiles' genericizer and instantiator on inputs no training used.

    Genericizer: share of outputs on held-out queries that pass the validator. Instantiator: on the
    held-out SQuAD articles' paragraphs, each paired with its best-matching seed template, the share
    that passes the excerpt rules, and the share that also scores >= min_score under the baseline's
    judge (one judge for both sides).
    """
    queries = distill.heldout_queries(baseline.root, queries_per_source)
    pairs = heldout_pairs(baseline, paragraphs)
    report: dict[str, Any] = {}
    for name, cfg in (("baseline", baseline), ("student", student)):
        report[name] = {
            "genericizer": _genericizer_report(cfg, name, queries, logger),
            "instantiator": _instantiator_report(cfg, baseline, name, pairs, logger),
        }
        logger(f"{name}: {report[name]}")
    return report
