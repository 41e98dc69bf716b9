"""How often the judging is right: a labelled set of pairs, and precision, recall and ROC-AUC on it.

The set (`sample_data/eval/judge_labels.jsonl`, see its README) holds rows of (document excerpt,
template, instruction, answer, label, reason) with a `dev` and a `heldout` split. Thresholds are tuned
on dev only (`gates.calibrate_relevance`); figures are reported on heldout.

Three configurations are measured on the same rows: the judge alone (score >= min_score), the gates
alone, and both (the pipeline's decision, `gates.decide`). "Positive" is a good pair: precision is the
share of accepted pairs that are good, recall the share of good pairs accepted. ROC-AUC ranks by each
configuration's score: the judge's score; the relevance cosine, below every pair passing the other
gates for one that fails them; and for both, the judge's score for pairs passing every gate and 0
otherwise, with the cosine breaking ties.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import gates, judge
from .config import Config, GateSettings

REASONS = (
    "good",
    "off_topic_answer",
    "not_a_request",
    "does_not_answer",
    "answer_leaked",
    "ungrounded_fill",
    "fragment",
)
SPLITS = ("dev", "heldout")
FIELDS = (
    "id",
    "split",
    "origin",
    "corpus",
    "document_id",
    "document_excerpt",
    "template",
    "instruction",
    "answer",
    "label",
    "reason",
)
CONFIGURATIONS = ("judge", "gates", "gates+judge")


class LabelledSetError(ValueError):
    """A labelled set that cannot be read, or a row in it that breaks the format."""


@dataclass(frozen=True)
class LabelledPair:
    id: str
    split: str
    origin: str
    corpus: str
    document_id: str
    document_excerpt: str
    template: str
    instruction: str
    answer: str
    label: str
    reason: str
    document: str = ""  # the whole shipped document (`document_file`), else the excerpt

    @property
    def good(self) -> bool:
        return self.label == "good"


def load_labelled_pairs(path: Path, split: str | None = None) -> list[LabelledPair]:
    """Every row of the set (or of one split); a malformed row is an error naming its line."""
    if split is not None and split not in SPLITS:
        raise LabelledSetError(f"split must be one of {SPLITS}, not {split!r}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelledSetError(f"cannot read the labelled set {path}: {exc}") from None
    rows, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LabelledSetError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise LabelledSetError(f"{where}: a row must be a JSON object")
        missing = [f for f in FIELDS if not isinstance(obj.get(f), str)]
        if missing:
            raise LabelledSetError(f"{where}: missing or non-string field(s) {missing}")
        if obj["reason"] not in REASONS:
            raise LabelledSetError(f"{where}: reason {obj['reason']!r} is not one of {REASONS}")
        if (obj["label"] == "good") != (obj["reason"] == "good") or obj["label"] not in ("good", "bad"):
            raise LabelledSetError(f"{where}: label {obj['label']!r} does not fit reason {obj['reason']!r}")
        if obj["split"] not in SPLITS:
            raise LabelledSetError(f"{where}: split {obj['split']!r} is not one of {SPLITS}")
        if obj["id"] in seen:
            raise LabelledSetError(f"{where}: id {obj['id']!r} appears twice")
        seen.add(obj["id"])
        if split is None or obj["split"] == split:
            document = _document(path.parent, obj.get("document_file"), obj["document_id"], where)
            rows.append(LabelledPair(**{f: obj[f] for f in FIELDS}, document=document or obj["document_excerpt"]))
    if not rows:
        raise LabelledSetError(f"the labelled set {path} has no row{'' if split is None else f' in split {split!r}'}")
    return rows


@functools.lru_cache(maxsize=16)
def _documents(path: Path) -> dict[str, str]:
    """id -> text of a shipped corpus file: a JSONL file's rows (`id` or `pid`), or one text file."""
    if path.suffix != ".jsonl":
        return {path.name: path.read_text(encoding="utf-8")}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        out[str(obj.get("id", obj.get("pid")))] = obj["text"]
    return out


def _document(root: Path, file: str | None, document_id: str, where: str) -> str | None:
    """The row's whole document, which the gates read as the pipeline's stage does (a name said once at
    the top of a page is grounded for every pair of that page)."""
    if not file:
        return None
    path = (root / file).resolve()
    try:
        docs = _documents(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as exc:
        raise LabelledSetError(f"{where}: document_file {file!r} cannot be read: {exc}") from None
    if document_id not in docs and len(docs) == 1:
        return next(iter(docs.values()))
    if document_id not in docs:
        raise LabelledSetError(f"{where}: document {document_id!r} is not in {file}")
    return docs[document_id]


# ------------------------------------------------------------------------------------ measuring


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a random good pair ranks above a random bad one), ties counted half (Mann-Whitney U)."""
    if not len(positive) or not len(negative):
        return None
    p = np.asarray(positive, dtype=np.float64)[:, None]
    q = np.asarray(negative, dtype=np.float64)[None, :]
    return float(((p > q).sum() + 0.5 * (p == q).sum()) / (p.size * q.size))


def binary_metrics(good: Sequence[bool], accepted: Sequence[bool], rank: Sequence[float]) -> dict[str, Any]:
    g, a, r = np.asarray(good, bool), np.asarray(accepted, bool), np.asarray(rank, np.float64)
    tp = int((g & a).sum())
    return {
        "rows": int(len(g)),
        "good": int(g.sum()),
        "accepted": int(a.sum()),
        "accepted_good": tp,
        "precision": round(tp / int(a.sum()), 4) if a.any() else None,
        "recall": round(tp / int(g.sum()), 4) if g.any() else None,
        "roc_auc": None if (auc := roc_auc(r[g], r[~g])) is None else round(auc, 4),
    }


@dataclass(frozen=True)
class Judgement:
    """One labelled pair under one judging configuration: gates, score, and the three decisions."""

    outcome: gates.GateOutcome
    score: int | None

    def decision(self, configuration: str, min_score: int) -> tuple[bool, float]:
        """(accepted, ranking score) under `configuration`."""
        o, s = self.outcome, self.score or 0
        passes = o.reason is None
        if configuration == "judge":
            return s >= min_score, float(s)
        if configuration == "gates":
            others = o.reason in (None, gates.REASONS["relevance"])
            return passes, o.relevance - (0.0 if others else 2.0)
        return gates.decide(o, self.score, min_score), (float(s) if passes else 0.0) + 0.01 * o.relevance


def gate_outcomes(
    pairs: Sequence[LabelledPair], settings: GateSettings, threshold: float, embed: Callable[[list[str]], np.ndarray]
) -> list[gates.GateOutcome]:
    """The gates on labelled pairs, reading each pair's whole document (else its excerpt)."""
    return gates.evaluate_all(
        [p.instruction for p in pairs],
        [p.answer for p in pairs],
        [p.template for p in pairs],
        [p.document for p in pairs],
        embed,
        settings,
        threshold,
    )


def relevance_threshold(
    settings: GateSettings, dev: Sequence[LabelledPair] | None, embed: Callable[[list[str]], np.ndarray]
) -> float:
    """The gate's threshold: its number, or calibrated on the dev split's good pairs."""
    if settings.relevance_threshold != "calibrated":
        return float(settings.relevance_threshold)
    if not dev:
        raise LabelledSetError(
            "gates.relevance_threshold: calibrated needs judge.labelled_set (its dev split's good pairs); "
            "set one or give the gate a number"
        )
    good = [p for p in dev if p.good]
    cos = gates.relevance(embed, [p.instruction for p in good], [p.answer for p in good])
    return gates.calibrate_relevance(cos.tolist(), settings.relevance_keep_good)


def report(pairs: Sequence[LabelledPair], judgements: Sequence[Judgement], min_score: int) -> dict[str, Any]:
    """Per configuration: metrics over all rows, and per bad reason over (good rows + that reason's)."""
    out: dict[str, Any] = {}
    good = [p.good for p in pairs]
    for conf in CONFIGURATIONS:
        dec = [j.decision(conf, min_score) for j in judgements]
        acc, rank = [d[0] for d in dec], [d[1] for d in dec]
        per_reason = {}
        for reason in REASONS[1:]:
            idx = [i for i, p in enumerate(pairs) if p.good or p.reason == reason]
            bad = [i for i in idx if not pairs[i].good]
            if not bad:
                continue
            m = binary_metrics([good[i] for i in idx], [acc[i] for i in idx], [rank[i] for i in idx])
            m["rejected_share"] = round(sum(not acc[i] for i in bad) / len(bad), 4)
            per_reason[reason] = m
        out[conf] = {"all": binary_metrics(good, acc, rank), "per_reason": per_reason}
    return out


def report_table(rep: dict[str, Any]) -> str:
    """Markdown: one row per configuration, then each bad reason's share rejected."""
    reasons = list(next(iter(rep.values()))["per_reason"])
    head = "| configuration | precision | recall | ROC-AUC | accepted |" + "".join(f" {r} |" for r in reasons)
    lines = [head, "|" + "---|" * (5 + len(reasons))]
    for conf, m in rep.items():
        a = m["all"]
        cells = "".join(f" {m['per_reason'][r]['rejected_share']:.0%} |" for r in reasons)
        lines.append(
            f"| {conf} | {_f(a['precision'])} | {_f(a['recall'])} | {_f(a['roc_auc'])} | "
            f"{a['accepted']}/{a['rows']} |{cells}"
        )
    lines.append("")
    lines.append("Per reason: the share of that reason's bad pairs each configuration rejects.")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def score_distribution(pairs: Sequence[LabelledPair], scores: Sequence[int | None]) -> dict[str, dict[str, int]]:
    """reason -> {score: count} ("none" for an unparseable judge answer)."""
    dist: dict[str, dict[str, int]] = {}
    for p, s in zip(pairs, scores, strict=True):
        cell = dist.setdefault(p.reason, {})
        key = "none" if s is None else str(s)
        cell[key] = cell.get(key, 0) + 1
    return {r: dict(sorted(dist[r].items())) for r in REASONS if r in dist}


def score_distribution_svg(dist: dict[str, dict[str, int]], width: int = 480, height: int = 220) -> str:
    """One bar per reason, stacked by the judge's score 1..5, as shares of that reason's rows."""
    colours = {"1": "#d62728", "2": "#ff7f0e", "3": "#bcbd22", "4": "#2ca02c", "5": "#1f77b4", "none": "#999999"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="9">']
    bar = (width - 60) / max(len(dist), 1)
    for b, (reason, cell) in enumerate(dist.items()):
        total, y = sum(cell.values()), float(height - 40)
        for score in ("none", "1", "2", "3", "4", "5"):
            n = cell.get(score, 0)
            h = (height - 60) * n / total if total else 0
            y -= h
            parts.append(
                f'<rect x="{10 + b * bar:.1f}" y="{y:.1f}" width="{bar * 0.8:.1f}" height="{h:.1f}" '
                f'fill="{colours[score]}"><title>{reason}: score {score}: {n}/{total}</title></rect>'
            )
        parts.append(
            f'<text x="{10 + b * bar + bar * 0.4:.1f}" y="{height - 28}" text-anchor="middle">{reason[:12]}</text>'
        )
    for i, score in enumerate(("1", "2", "3", "4", "5")):
        parts.append(f'<text x="{width - 40}" y="{14 + 12 * i}" fill="{colours[score]}">score {score}</text>')
    parts.append("</svg>")
    return "".join(parts)


def outcome_record(p: LabelledPair, j: Judgement) -> dict[str, Any]:
    """One row of `eval-judge --rows`: the pair's label and what each part of the judging said."""
    return {"id": p.id, "split": p.split, "label": p.label, "reason": p.reason, "score": j.score} | {
        f"gate_{k}": v for k, v in asdict(j.outcome).items()
    }


def evaluate_profile(
    cfg: Config, path: Path, split: str = "heldout", logger: Callable[[str], None] = print
) -> tuple[list[LabelledPair], list[Judgement], dict[str, Any]]:
    """The active profile's gates (embedder, thresholds) and judge on one split of the labelled set:
    (pairs, judgements, report); the relevance threshold is calibrated on dev, never on `split`."""
    from .embed import Embedder
    from .llm_requests import judge_request
    from .stage_base import ProgressReporter, llm_for

    pairs = load_labelled_pairs(path, split)
    dev = load_labelled_pairs(path, "dev")
    embed = Embedder(cfg.embedder).embed_texts
    settings = cfg.gates
    threshold = relevance_threshold(settings, dev, embed)
    outcomes = gate_outcomes(pairs, settings, threshold, embed)
    llm = llm_for(cfg, "judge")
    results = llm.generate(
        [judge_request(cfg, p.instruction, p.answer) for p in pairs], progress=ProgressReporter("judge", logger)
    )
    judgements = [Judgement(o, judge.result_score(r)) for o, r in zip(outcomes, results, strict=True)]
    rep = report(pairs, judgements, cfg.min_score)
    meta = {
        "profile": cfg.profile_name,
        "embedder": cfg.embedder,
        "judge": cfg.models["judge"].model,
        "split": split,
        "rows": len(pairs),
        "relevance_threshold": round(threshold, 4),
        "min_score": cfg.min_score,
        "score_distribution": score_distribution(pairs, [j.score for j in judgements]),
    }
    return pairs, judgements, {"settings": meta, "configurations": rep}
