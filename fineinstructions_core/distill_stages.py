"""The distillation loop's stages: silver examples from a teacher, students trained on seeds + silver,
and the matching embedder fine-tuned on labelled pairs or the teacher's compatibility judgment. Each
takes a `StageContext` and writes the lake and its accounting like every other stage (declared in
`registry.py`), so the Dagster assets, the CLI and the tests run the same code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import compatibility, distill, genericize, instantiate, judge
from .config import CALIBRATED_THRESHOLD_FILE, Config, ConfigError, TrainingSettings, plain
from .ids import content_id
from .io.lake import Lake
from .llm.base import LLMStats
from .llm.models import resolve_llm
from .llm_requests import compatibility_request, genericize_requests, instantiation_requests
from .plots import svg_markdown
from .stage_base import Logger, ProgressReporter, StageContext, StageResult, llm_for
from .training import TrainReport, loss_curve_svg, train_causal_lm, train_embedder

if TYPE_CHECKING:
    from .embed import Embedder
    from .evaluation import LabelledSet

log = logging.getLogger(__name__)


def teacher_config(cfg: Config) -> Config:
    """The project config with the teacher profile active (the teacher is any configured profile)."""
    return cfg.with_profile(cfg.distillation.teacher_profile)


def _sample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or len(df) <= n:
        return df.reset_index(drop=True)
    return df.sample(n=n, random_state=seed).sort_index().reset_index(drop=True)


def _rejections(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["reason", "detail"])


def _training_matches(lake: Lake, shards: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The shards' template matches, without those of held-out articles' documents (no held-out measure
    is trained on), and their documents indexed by id."""
    matches = lake.read_all("template_matches", shards)
    docs = lake.read_all("documents", shards)
    if not len(matches):
        return matches, docs
    docs = docs.set_index("document_id")
    if "title" in docs:
        held = docs.index[docs["title"].isin(distill.HELDOUT_ARTICLES)]
        matches = matches[~matches["document_id"].isin(set(held))]
    return matches, docs


# ------------------------------------------------------------------------------------ silver examples


def silver_genericizer_examples(ctx: StageContext) -> StageResult:
    """Seeds + the teacher's validated genericizations of a sample of the query set."""
    cfg, d = ctx.cfg, ctx.cfg.distillation
    seed = d.seed
    seeds = distill.load_genericizer_seeds()
    queries = ctx.lake.read_all("query_set", ctx.sources)
    excluded = set(seeds["query"]) | set(distill.heldout_queries(cfg.root)["query"])
    pool = queries[~queries["query"].isin(excluded)] if len(queries) else queries
    sample = _sample(pool, d.silver_genericizer_queries, seed)
    teacher = teacher_config(cfg)
    results, stats = ctx.run_llm("genericize", genericize_requests(teacher, sample["query"]), teacher)
    kept, rejected = genericize.genericize_results(sample, results)
    profile = teacher.profile_name
    silver = kept.assign(
        example_id=[distill.example_id("g", q, t) for q, t in zip(kept["query"], kept["template"], strict=True)],
        provenance=f"silver:{profile}",
    )[distill.GENERICIZER_COLUMNS]
    merged = pd.concat([seeds, silver], ignore_index=True)
    dup = merged.duplicated("example_id", keep="first")
    dups = merged[dup].assign(reason="duplicate_example", detail="")
    out, invalid = distill.check_genericizer_examples(merged[~dup].reset_index(drop=True))
    rej = _rejections([rejected.assign(provenance=f"silver:{profile}"), dups, invalid.assign(detail="")])
    ctx.logger(
        f"silver genericizer examples: {len(seeds)} seeds + {len(silver)} silver of {len(sample)} sampled queries"
    )
    return ctx.finish(
        out,
        rej,
        len(seeds) + len(sample),
        llm=stats,
        seeds=len(seeds),
        silver=int((out["provenance"] != "seed").sum()),
        teacher=profile,
    )


def silver_instantiation_examples(ctx: StageContext) -> StageResult:
    """Seeds + the teacher's instantiations of a sample of template matches that pass the excerpt rules.

    The example keeps the window the teacher read (what the student will read) and the compact answer
    with its excerpt tags (what the student must write). Documents of held-out articles never enter.
    """
    cfg, lake = ctx.cfg, ctx.lake
    ins = cfg.instantiation
    seeds = distill.load_instantiation_seeds()
    matches, docs = _training_matches(lake, ctx.shards)
    frames: list[pd.DataFrame] = []
    sample = _sample(matches, cfg.distillation.silver_instantiation_matches, cfg.distillation.seed)
    teacher = teacher_config(cfg)
    stats = None
    silver_rows: list[dict[str, Any]] = []
    if len(sample):
        templates = lake.read("template_index").set_index("template_id")["template"]
        _, windows, reqs = instantiation_requests(teacher, sample, docs["text"], templates)
        results, stats = ctx.run_llm("instantiate", reqs, teacher)
        profile = teacher.profile_name
        for row, window, res in zip(sample.itertuples(index=False), windows, results, strict=True):
            template = templates[row.template_id]
            base = {"match_id": row.match_id, "document_id": row.document_id, "template": template}
            if res.error:
                frames.append(pd.DataFrame([base | {"reason": "llm_error", "detail": res.error}]))
                continue
            check = instantiate.check_instantiation(
                template, window, res.text, 0, ins.min_excerpt_ratio, ins.max_span_chars, ins.min_answer_words
            )
            if check.status != "ok" or check.parsed is None:
                # A teacher's `null` is not trusted as a label; the seeds teach refusals.
                frames.append(pd.DataFrame([base | {"reason": f"teacher_{check.status}", "detail": check.detail}]))
                continue
            silver_rows.append(
                {
                    "example_id": distill.example_id("i", row.document_id, template),
                    "corpus": row.corpus,
                    "document_id": row.document_id,
                    "template": template,
                    "document": window,
                    "instruction": check.parsed.instruction,
                    "answer": check.parsed.answer,
                    "provenance": f"silver:{profile}",
                }
            )
    silver = pd.DataFrame(silver_rows, columns=distill.INSTANTIATION_COLUMNS)
    merged = pd.concat([seeds, silver], ignore_index=True)
    dup = merged.duplicated("example_id", keep="first")
    frames.append(merged[dup].assign(reason="duplicate_example", detail=""))
    out, invalid = distill.check_instantiation_examples(
        merged[~dup].reset_index(drop=True), ins.min_excerpt_ratio, ins.max_span_chars, ins.min_answer_words
    )
    frames.append(invalid.assign(detail=""))
    ctx.logger(f"silver instantiation examples: {len(seeds)} seeds + {len(silver)} silver of {len(sample)} matches")
    return ctx.finish(
        out,
        _rejections(frames),
        len(seeds) + len(sample),
        llm=stats,
        seeds=len(seeds),
        silver=int((out["provenance"] != "seed").sum()),
    )


# ------------------------------------------------------------------------------------ students


def model_dir(cfg: Config, asset: str) -> Path:
    """Where a training asset leaves its model (`<data_dir>/models/<asset>/model`)."""
    return cfg.data_dir / "models" / asset


def _train_result(
    ctx: StageContext,
    report: TrainReport,
    rows_in: int,
    curves: dict[str, list[tuple[int, float]]] | None = None,
    rejected: pd.DataFrame | None = None,
    **extra: Any,
) -> StageResult:
    """The one-row model table and its accounting; `curves` are the plotted losses (default: the report's),
    `rejected` the inputs that never became examples (on top of those too long to train on)."""
    first_eval = report.eval_losses[0][1] if report.eval_losses else None
    last_eval = report.eval_losses[-1][1] if report.eval_losses else None
    row = {
        "model_id": content_id("model", ctx.name, report.model_dir, report.steps, report.losses[-1:] or None),
        "model_dir": report.model_dir,
        "steps": report.steps,
        "train_examples": report.train_examples,
        "eval_examples": report.eval_examples,
        "final_train_loss": report.losses[-1][1] if report.losses else None,
        "eval_loss_before": first_eval,
        "eval_loss_after": last_eval,
        "seconds": report.seconds,
    }
    too_long = pd.DataFrame(
        [{"reason": "too_long_for_max_tokens", "detail": ""}] * report.skipped_too_long, columns=["reason", "detail"]
    )
    rej = _rejections([too_long] + ([rejected] if rejected is not None else []))
    return ctx.finish(
        pd.DataFrame([row]),
        rej,
        rows_in,
        rows_out=report.train_examples + report.eval_examples,
        loss_curve=svg_markdown(
            loss_curve_svg(curves or {"train": report.losses, "held-out": report.eval_losses}), "loss curve"
        ),
        eval_losses=report.eval_losses,
        train_seconds=report.seconds,
        resumed_from_step=report.resumed_from_step,
        **extra,
    )


def _training_args(settings: TrainingSettings, seed: int, logger: Logger) -> dict[str, Any]:
    """A training section as the keyword arguments both trainers take (the field names are theirs)."""
    return plain(settings) | {"seed": seed, "logger": logger}


def _train_student(ctx: StageContext, examples: list, settings: TrainingSettings) -> TrainReport:
    cfg = ctx.cfg
    base, _ = resolve_llm(cfg.distillation.student, cfg.cache_dir)
    args = _training_args(settings, cfg.distillation.seed, ctx.logger)
    return train_causal_lm(base, examples, model_dir(cfg, ctx.name), **args)


def _require_finished(asset: str, report: TrainReport) -> None:
    if not report.finished:
        raise TimeoutError(
            f"{asset}: the time budget ran out at step {report.steps}; the checkpoint is kept, materialize again "
            "to resume"
        )


def genericizer_model(ctx: StageContext) -> StageResult:
    """The student genericizer: the student model fine-tuned on the genericizer examples."""
    examples = ctx.lake.read("silver_genericizer_examples")
    sft = distill.genericizer_sft_examples(examples)
    report = _train_student(ctx, sft, ctx.cfg.distillation.genericizer)
    _require_finished(ctx.name, report)
    return _train_result(ctx, report, len(examples))


def instantiator_model(ctx: StageContext) -> StageResult:
    """The student instantiator: the student model fine-tuned on the instantiation examples."""
    examples = ctx.lake.read("silver_instantiation_examples")
    sft = distill.instantiation_sft_examples(examples, ctx.cfg.instantiation.window_chars)
    report = _train_student(ctx, sft, ctx.cfg.distillation.instantiator)
    _require_finished(ctx.name, report)
    return _train_result(ctx, report, len(examples))


# ------------------------------------------------------------------------------------ matching embedding


def labelled_pairs(data: LabelledSet, base: Embedder, max_pairs: int | None, seed: int) -> list[tuple[str, str, float]]:
    """(question, paragraph, label) pairs: a seeded sample of at most `max_pairs` / 2 questions (None: all), each
    with its own paragraph (1) and the other paragraph the base model ranks highest for it (0).

    The hard negative is usually another paragraph of the same article: what a document's own templates
    must out-rank at retrieval time, and what negatives from other articles never teach.
    """
    rng = np.random.default_rng(seed)
    answerable = [i for i in range(len(data.questions)) if not data.impossible[i]]
    if len(data.pids) < 2 or not answerable:
        raise ValueError("labelled pairs need answerable questions and at least two paragraphs")
    size = len(answerable) if max_pairs is None else min(len(answerable), max(1, max_pairs // 2))
    sample = np.sort(rng.choice(answerable, size=size, replace=False))
    P = base.embed_texts(data.texts)
    Q = base.embed_texts([data.questions[i] for i in sample])
    pid_pos = {p: j for j, p in enumerate(data.pids)}
    pairs: list[tuple[str, str, float]] = []
    for row, qi in enumerate(sample):
        own = pid_pos[data.question_pids[qi]]
        sims = P @ Q[row]
        sims[own] = -np.inf
        negative = int(np.argmax(sims))
        pairs.append((data.questions[qi], data.texts[own], 1.0))
        pairs.append((data.questions[qi], data.texts[negative], 0.0))
    return pairs


def teacher_judged_pairs(
    cfg: Config, shards: list[str], logger: Logger
) -> tuple[list[tuple[str, str, float]], pd.DataFrame, LLMStats | None, int]:
    """The paper's labels: the teacher's judge scores each sampled document's top template matches for
    compatibility; >= `compatible_min_score` is 1, <= `incompatible_max_score` is 0. A pair is the
    template's description (what the index embeds) and the document window the judge read.

    Returns (pairs, rejections with reasons, LLM stats, matches judged). Documents of the held-out
    articles never enter, so the held-out recall stays a fair measure.
    """
    d = cfg.distillation
    tj = d.embedding.teacher_judgment
    lo, hi = tj.incompatible_max_score, tj.compatible_min_score
    compatibility.label(hi, hi, lo)  # rejects overlapping cut-offs before any request
    own = model_dir(cfg, "matching_embedding").resolve()
    if Path(cfg.embedder).resolve().is_relative_to(own):
        raise ValueError(
            f"labels: teacher_judgment labels the template matches of the active profile, whose embedder "
            f"({cfg.embedder}) is the one this asset trains: each run would train on its own matches. "
            "Materialize the pipeline and the distillation with another profile (e.g. model_profile: embedded)"
        )
    lake = Lake(cfg.lake_dir)
    matches, docs = _training_matches(lake, shards)
    if not len(matches):
        raise ValueError(
            "matching_embedding with labels: teacher_judgment needs template_matches outside the held-out "
            "articles: materialize the pipeline up to template_matches first"
        )
    matches = matches[matches["rank"] < tj.templates_per_document]
    sample = _sample(matches, tj.matches, d.seed)
    index = lake.read("template_index").set_index("template_id")
    teacher = teacher_config(cfg)
    window_chars = cfg.instantiation.window_chars
    windows = [
        instantiate.document_window(docs.at[r.document_id, "text"], r.chunk_char_center, window_chars)[1]
        for r in sample.itertuples(index=False)
    ]
    reqs = [
        compatibility_request(teacher, index.at[t, "template"], w)
        for t, w in zip(sample["template_id"], windows, strict=True)
    ]
    stats = None
    results = []
    if reqs:
        llm = llm_for(teacher, "judge")
        results = llm.generate(reqs, progress=ProgressReporter("judge", logger))
        stats = llm.stats
    pairs: list[tuple[str, str, float]] = []
    rejected: list[dict[str, Any]] = []
    for row, window, res in zip(sample.itertuples(index=False), windows, results, strict=True):
        base = {"match_id": row.match_id, "document_id": row.document_id, "template_id": row.template_id}
        parsed = None if res.error else judge.parse_output(res.text)
        if res.error:
            rejected.append(base | {"reason": "llm_error", "detail": res.error})
        elif parsed is None:
            rejected.append(base | {"reason": "judge_unparseable", "detail": res.text[:300]})
        elif (label := compatibility.label(parsed[0], hi, lo)) is None:
            rejected.append(base | {"reason": "compatibility_uncertain", "detail": f"score {parsed[0]}"})
        else:
            pairs.append((index.at[row.template_id, "description"], window, label))
    positives = sum(p[2] for p in pairs)
    logger(f"teacher judgment: {len(sample)} matches, {positives:.0f} compatible, {len(pairs) - positives:.0f} not")
    return (
        pairs,
        pd.DataFrame(rejected, columns=["match_id", "document_id", "template_id", "reason", "detail"]),
        stats,
        len(sample),
    )


def _recall(held: LabelledSet, embedder: Embedder, cfg: Config) -> dict[str, Any]:
    """Recall@k on the held-out articles, and the best-F1 threshold there for this embedder."""
    from .evaluation import calibrate_threshold, evaluate

    m = cfg.matching
    pooled = embedder.embed_documents(held.texts, m.k, m.sigma, m.alpha, min_width=m.min_local_width)
    keep = [True] * len(held.questions)
    metrics = evaluate(held, list(held.questions), keep, embedder, pooled, m.threshold)
    calibration = calibrate_threshold(held, list(held.questions), keep, embedder, pooled)
    return metrics["metrics"] | {"threshold": {k: v for k, v in calibration.items() if k != "table"}}


def _heldout_and_training_sets(cfg: Config) -> tuple[LabelledSet, LabelledSet]:
    """The labelled questions and paragraphs split into the training articles and the held-out ones."""
    from .evaluation import load_labelled_set, subset_by_titles

    e = cfg.distillation.embedding
    if not e.questions or not e.paragraphs:
        raise ConfigError(
            "distillation.embedding.questions and .paragraphs: the matching embedding needs a labelled set "
            "(questions linked to paragraphs) for its held-out recall"
        )
    data = load_labelled_set(cfg.path(e.questions), cfg.path(e.paragraphs))
    train = subset_by_titles(data, distill.HELDOUT_ARTICLES, keep=False)
    held = subset_by_titles(data, distill.HELDOUT_ARTICLES, keep=True)
    if e.max_heldout_questions and len(held.questions) > e.max_heldout_questions:
        held = subset_by_titles(held, distill.HELDOUT_ARTICLES, keep=True, max_questions=e.max_heldout_questions)
    return train, held


def _embedding_labels(
    ctx: StageContext, train: LabelledSet, base: Embedder
) -> tuple[list[tuple[str, str, float]], pd.DataFrame | None, LLMStats | None, int]:
    """(pairs, label rejections, LLM stats, rows in) from the configured label source."""
    e = ctx.cfg.distillation.embedding
    if e.labels == "teacher_judgment":
        pairs, rejections, stats, rows_in = teacher_judged_pairs(ctx.cfg, ctx.shards, ctx.logger)
    else:
        pairs = labelled_pairs(train, base, e.max_pairs, ctx.cfg.distillation.seed)
        rejections, stats, rows_in = None, None, len(pairs)
    if {p[2] for p in pairs} != {0.0, 1.0}:
        raise ValueError(
            f"matching_embedding: {len(pairs)} labelled pairs ({e.labels}) without both a compatible and an "
            "incompatible one; a one-sided cosine loss would collapse the embedding space"
        )
    return pairs, rejections, stats, rows_in


def _write_calibrated_threshold(final_dir: Path, after: dict[str, Any]) -> None:
    """A profile with `matching_threshold: calibrated` reads this beside the embedder's weights."""
    calibrated = {"threshold": after["threshold"]["proposed_threshold"], "measured_on": "held-out articles"}
    tmp = final_dir / f".{CALIBRATED_THRESHOLD_FILE}.tmp"
    tmp.write_text(
        json.dumps(calibrated | after["threshold"] | {"heldout_articles": list(distill.HELDOUT_ARTICLES)}, indent=1),
        encoding="utf-8",
    )
    tmp.replace(final_dir / CALIBRATED_THRESHOLD_FILE)


def matching_embedding(ctx: StageContext) -> StageResult:
    """Round one on 1/0 labels (`labelled_pairs` from the training articles, or `teacher_judged_pairs`),
    round two on the labelled document's best Gaussian chunk. Recall@10 and the best-F1 threshold on
    the held-out articles are measured before and after; the threshold is saved beside the model."""
    from .embed import Embedder

    cfg, logger = ctx.cfg, ctx.logger
    e, m = cfg.distillation.embedding, cfg.matching
    train, held = _heldout_and_training_sets(cfg)
    base = Embedder(e.base)  # never the active profile's: it may be this model
    pairs, label_rejections, label_llm, rows_in = _embedding_labels(ctx, train, base)
    before = _recall(held, base, cfg)
    logger(
        f"held-out recall@10 before: global {before['global']['recall@10']}, gaussian {before['gaussian']['recall@10']}"
    )
    out_root = model_dir(cfg, "matching_embedding")
    settings = _training_args(e.training(), cfg.distillation.seed, logger)
    settings["max_tokens"] = min(base.window, e.max_tokens)
    round1 = train_embedder(base.path, pairs, out_root / "round1", **settings)
    _require_finished("matching_embedding", round1)
    reports = {"round1": round1}
    final_dir = Path(round1.model_dir)
    if e.round_two:
        # The labelled chunk: the local vector of the paragraph that the round-one model finds closest.
        tuned = Embedder(str(final_dir))
        pooled = tuned.embed_documents([p[1] for p in pairs], m.k, m.sigma, m.alpha, min_width=m.min_local_width)
        qv = tuned.embed_texts([p[0] for p in pairs])
        chunk_of = [int(np.argmax(doc.vectors[1:] @ q)) + 1 for doc, q in zip(pooled, qv, strict=True)]
        round2 = train_embedder(
            final_dir,
            pairs,
            out_root / "round2",
            chunk=(m.k, m.sigma, m.min_local_width),
            chunk_of=chunk_of,
            **settings,
        )
        _require_finished("matching_embedding", round2)
        reports["round2"] = round2
        final_dir = Path(round2.model_dir)
    after = _recall(held, Embedder(str(final_dir)), cfg)
    logger(
        f"held-out recall@10 after: global {after['global']['recall@10']}, gaussian {after['gaussian']['recall@10']}"
    )
    _write_calibrated_threshold(final_dir, after)
    series = {f"{name} train": r.losses for name, r in reports.items()}
    series |= {f"{name} held-out": r.eval_losses for name, r in reports.items()}
    return _train_result(
        ctx,
        reports.get("round2", round1),  # its model_dir is the final model
        rows_in,
        series,
        label_rejections,
        llm=label_llm,
        labels=e.labels,
        label_balance={"compatible": int(sum(p[2] for p in pairs)), "incompatible": int(sum(1 - p[2] for p in pairs))},
        heldout_recall_before={k: before[k] for k in ("global", "gaussian")},
        heldout_recall_after={k: after[k] for k in ("global", "gaussian")},
        calibrated_threshold={"before": before["threshold"], "after": after["threshold"]},
        heldout_articles=list(distill.HELDOUT_ARTICLES),
        rounds={name: r.as_dict() | {"losses": None} for name, r in reports.items()},
    )
