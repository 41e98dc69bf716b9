"""The distillation loop's stages: silver examples from a teacher, students trained on seeds + silver,
and the matching embedder fine-tuned on labelled pairs or the teacher's compatibility judgment. Each
writes the lake and its accounting like every other stage, so the Dagster assets, the CLI and the
tests run the same code.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import compatibility, distill, genericize, instantiate, judge
from .config import CALIBRATED_THRESHOLD_FILE, Config, parse_config
from .ids import content_id
from .io.lake import UNPARTITIONED, Lake
from .llm.base import LLMStats
from .llm.models import EMBEDDED_EMBEDDER, resolve_llm
from .stages import (
    Logger,
    StageResult,
    _constrained,
    _finish,
    _run_llm,
    genericize_requests,
    instantiation_requests,
)
from .training import TrainReport, loss_curve_svg, train_causal_lm, train_embedder

if TYPE_CHECKING:
    from .embed import Embedder
    from .evaluation import LabelledSet

log = logging.getLogger(__name__)


def _settings(cfg: Config) -> dict[str, Any]:
    return dict(cfg.raw.get("distillation") or {})


def teacher_config(cfg: Config) -> Config:
    """The project config with the teacher profile active (the teacher is any configured profile)."""
    raw = copy.deepcopy(cfg.raw)
    raw["model_profile"] = _settings(cfg).get("teacher_profile", "embedded")
    return parse_config(raw, cfg.root)


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


def silver_genericizer_examples(cfg: Config, sources: list[str], logger: Logger = log.info) -> StageResult:
    """Seeds + the teacher's validated genericizations of a sample of the query set."""
    d = _settings(cfg)
    seed = int(d.get("seed", 0))
    seeds = distill.load_genericizer_seeds()
    queries = Lake(cfg.lake_dir).read_all("query_set", sources)
    excluded = set(seeds["query"]) | set(distill.heldout_queries(cfg.root)["query"])
    pool = queries[~queries["query"].isin(excluded)] if len(queries) else queries
    sample = _sample(pool, d.get("silver_genericizer_queries"), seed)
    teacher = teacher_config(cfg)
    results, stats = _run_llm(teacher, "genericize", genericize_requests(teacher, sample["query"]), logger)
    kept, rejected = genericize.genericize_results(sample, results)
    profile = teacher.raw.get("model_profile", "embedded")
    silver = kept.assign(
        example_id=[distill.example_id("g", q, t) for q, t in zip(kept["query"], kept["template"], strict=True)],
        provenance=f"silver:{profile}",
    )[distill.GENERICIZER_COLUMNS]
    merged = pd.concat([seeds, silver], ignore_index=True)
    dup = merged.duplicated("example_id", keep="first")
    dups = merged[dup].assign(reason="duplicate_example", detail="")
    out, invalid = distill.check_genericizer_examples(merged[~dup].reset_index(drop=True))
    rej = _rejections([rejected.assign(provenance=f"silver:{profile}"), dups, invalid.assign(detail="")])
    logger(f"silver genericizer examples: {len(seeds)} seeds + {len(silver)} silver of {len(sample)} sampled queries")
    return _finish(
        cfg,
        "silver_genericizer_examples",
        UNPARTITIONED,
        out,
        rej,
        len(seeds) + len(sample),
        "examples",
        llm=stats,
        seeds=len(seeds),
        silver=int((out["provenance"] != "seed").sum()),
        teacher=profile,
    )


def silver_instantiation_examples(cfg: Config, shards: list[str], logger: Logger = log.info) -> StageResult:
    """Seeds + the teacher's instantiations of a sample of template matches that pass the excerpt rules.

    The example keeps the window the teacher read (what the student will read) and the compact answer
    with its excerpt tags (what the student must write). Documents of held-out articles never enter.
    """
    d = _settings(cfg)
    seed = int(d.get("seed", 0))
    ins = cfg.instantiation
    seeds = distill.load_instantiation_seeds()
    lake = Lake(cfg.lake_dir)
    matches, docs = _training_matches(lake, shards)
    frames: list[pd.DataFrame] = []
    sample = _sample(matches, d.get("silver_instantiation_matches"), seed)
    teacher = teacher_config(cfg)
    stats = None
    silver_rows: list[dict[str, Any]] = []
    if len(sample):
        templates = lake.read("template_index").set_index("template_id")["template"]
        _, windows, reqs = instantiation_requests(teacher, sample, docs["text"], templates)
        results, stats = _run_llm(teacher, "instantiate", reqs, logger)
        profile = teacher.raw.get("model_profile", "embedded")
        for row, window, res in zip(sample.itertuples(index=False), windows, results, strict=True):
            template = templates[row.template_id]
            base = {"match_id": row.match_id, "document_id": row.document_id, "template": template}
            if res.error:
                frames.append(pd.DataFrame([base | {"reason": "llm_error", "detail": res.error}]))
                continue
            check = instantiate.check_instantiation(
                template,
                window,
                res.text,
                0,
                float(ins.get("min_excerpt_ratio", 0.8)),
                int(ins.get("max_span_chars", 4000)),
                int(ins.get("min_answer_words", 0)),
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
        merged[~dup].reset_index(drop=True),
        float(ins.get("min_excerpt_ratio", 0.8)),
        int(ins.get("max_span_chars", 4000)),
        int(ins.get("min_answer_words", 0)),
    )
    frames.append(invalid.assign(detail=""))
    logger(f"silver instantiation examples: {len(seeds)} seeds + {len(silver)} silver of {len(sample)} matches")
    return _finish(
        cfg,
        "silver_instantiation_examples",
        UNPARTITIONED,
        out,
        _rejections(frames),
        len(seeds) + len(sample),
        "examples",
        llm=stats,
        seeds=len(seeds),
        silver=int((out["provenance"] != "seed").sum()),
    )


# ------------------------------------------------------------------------------------ students


def _svg_markdown(report_series: dict[str, list[tuple[int, float]]]) -> str:
    svg = loss_curve_svg(report_series)
    return f"![loss curve](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"


def model_dir(cfg: Config, asset: str) -> Path:
    """Where a training asset leaves its model (`<data_dir>/models/<asset>/model`)."""
    return cfg.data_dir / "models" / asset


def _train_result(
    cfg: Config,
    asset: str,
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
        "model_id": content_id("model", asset, report.model_dir, report.steps, report.losses[-1:] or None),
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
    return _finish(
        cfg,
        asset,
        UNPARTITIONED,
        pd.DataFrame([row]),
        rej,
        rows_in,
        "examples",
        rows_out=report.train_examples + report.eval_examples,
        loss_curve=_svg_markdown(curves or {"train": report.losses, "held-out": report.eval_losses}),
        eval_losses=report.eval_losses,
        train_seconds=report.seconds,
        resumed_from_step=report.resumed_from_step,
        **extra,
    )


def _train_student(cfg: Config, asset: str, examples: list, settings: dict[str, Any], logger: Logger) -> TrainReport:
    d = _settings(cfg)
    base, _ = resolve_llm(d.get("student", "embedded:smollm2-135m-instruct"), cfg.cache_dir)
    return train_causal_lm(
        base,
        examples,
        model_dir(cfg, asset),
        epochs=int(settings.get("epochs", 3)),
        lr=float(settings.get("lr", 5e-5)),
        batch_size=int(settings.get("batch_size", 8)),
        max_tokens=int(settings.get("max_tokens", 512)),
        eval_share=float(settings.get("eval_share", 0.1)),
        seed=int(d.get("seed", 0)),
        checkpoint_every=int(settings.get("checkpoint_every", 50)),
        max_steps=settings.get("max_steps"),
        time_budget_s=settings.get("time_budget_s"),
        logger=logger,
    )


def _require_finished(asset: str, report: TrainReport) -> None:
    if not report.finished:
        raise TimeoutError(
            f"{asset}: the time budget ran out at step {report.steps}; the checkpoint is kept, materialize again "
            "to resume"
        )


def genericizer_model(cfg: Config, logger: Logger = log.info) -> StageResult:
    examples = Lake(cfg.lake_dir).read("silver_genericizer_examples")
    sft = distill.genericizer_sft_examples(examples)
    report = _train_student(cfg, "genericizer_model", sft, _settings(cfg).get("genericizer") or {}, logger)
    _require_finished("genericizer_model", report)
    return _train_result(cfg, "genericizer_model", report, len(examples))


def instantiator_model(cfg: Config, logger: Logger = log.info) -> StageResult:
    examples = Lake(cfg.lake_dir).read("silver_instantiation_examples")
    sft = distill.instantiation_sft_examples(examples, int(cfg.instantiation.get("window_chars", 1200)))
    report = _train_student(cfg, "instantiator_model", sft, _settings(cfg).get("instantiator") or {}, logger)
    _require_finished("instantiator_model", report)
    return _train_result(cfg, "instantiator_model", report, len(examples))


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


EMBEDDING_LABELS = ("labelled_pairs", "teacher_judgment")


def teacher_judged_pairs(
    cfg: Config, shards: list[str], logger: Logger
) -> tuple[list[tuple[str, str, float]], pd.DataFrame, LLMStats | None, int]:
    """The paper's labels: the teacher's judge scores each sampled document's top template matches for
    compatibility; >= `compatible_min_score` is 1, <= `incompatible_max_score` is 0. A pair is the
    template's description (what the index embeds) and the document window the judge read.

    Returns (pairs, rejections with reasons, LLM stats, matches judged). Documents of the held-out
    articles never enter, so the held-out recall stays a fair measure.
    """
    d = _settings(cfg)
    tj = dict((d.get("embedding") or {}).get("teacher_judgment") or {})
    lo, hi = int(tj.get("incompatible_max_score", 2)), int(tj.get("compatible_min_score", 4))
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
    matches = matches[matches["rank"] < int(tj.get("templates_per_document", 5))]
    sample = _sample(matches, tj.get("matches"), int(d.get("seed", 0)))
    index = lake.read("template_index").set_index("template_id")
    teacher = teacher_config(cfg)
    spec = teacher.models["judge"]
    window_chars = int(cfg.instantiation.get("window_chars", 1200))
    windows = [
        instantiate.document_window(docs.at[r.document_id, "text"], r.chunk_char_center, window_chars)[1]
        for r in sample.itertuples(index=False)
    ]
    reqs = [
        compatibility.build_request(
            index.at[t, "template"],
            w,
            spec.model,
            spec.max_new_tokens,
            _constrained(spec, cfg.judge.get("constrained_score", True)),
            spec.prompt_format,
        )
        for t, w in zip(sample["template_id"], windows, strict=True)
    ]
    results, stats = _run_llm(teacher, "judge", reqs, logger) if reqs else ([], None)
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


def matching_embedding(cfg: Config, shards: list[str], logger: Logger = log.info) -> StageResult:
    """Round one on 1/0 labels (`labelled_pairs` from the training articles, or `teacher_judged_pairs`),
    round two on the labelled document's best Gaussian chunk. Recall@10 and the best-F1 threshold on
    the held-out articles are measured before and after; the threshold is saved beside the model."""
    from .embed import Embedder
    from .evaluation import calibrate_threshold, evaluate, load_labelled_set, subset_by_titles

    e = dict(_settings(cfg).get("embedding") or {})
    seed = int(_settings(cfg).get("seed", 0))
    m = cfg.matching
    K, sigma, alpha = int(m.get("k", 5)), float(m.get("sigma", 0.05)), float(m.get("alpha", 1.0))
    data = load_labelled_set(cfg.root / e["questions"], cfg.root / e["paragraphs"])
    train = subset_by_titles(data, distill.HELDOUT_ARTICLES, keep=False)
    held = subset_by_titles(data, distill.HELDOUT_ARTICLES, keep=True)
    if e.get("max_heldout_questions") and len(held.questions) > int(e["max_heldout_questions"]):
        held = subset_by_titles(
            held, distill.HELDOUT_ARTICLES, keep=True, max_questions=int(e["max_heldout_questions"])
        )
    base = Embedder(str(e.get("base", EMBEDDED_EMBEDDER)))  # never the active profile's: it may be this model

    def recall(embedder: Embedder) -> dict[str, Any]:
        """Recall@k on the held-out articles, and the best-F1 threshold there for this embedder."""
        pooled = embedder.embed_documents(held.texts, K, sigma, alpha)
        keep = [True] * len(held.questions)
        metrics = evaluate(held, list(held.questions), keep, embedder, pooled, float(m.get("threshold", 0.25)))
        calibration = calibrate_threshold(held, list(held.questions), keep, embedder, pooled)
        return metrics["metrics"] | {"threshold": {k: v for k, v in calibration.items() if k != "table"}}

    labels = str(e.get("labels", "labelled_pairs"))
    if labels not in EMBEDDING_LABELS:
        raise ValueError(f"distillation.embedding.labels must be one of {EMBEDDING_LABELS}, not {labels!r}")
    if labels == "teacher_judgment":
        pairs, label_rejections, label_llm, rows_in = teacher_judged_pairs(cfg, shards, logger)
    else:
        max_pairs = e.get("max_pairs", 2000)
        pairs = labelled_pairs(train, base, None if max_pairs is None else int(max_pairs), seed)
        label_rejections, label_llm, rows_in = None, None, len(pairs)
    if {p[2] for p in pairs} != {0.0, 1.0}:
        raise ValueError(
            f"matching_embedding: {len(pairs)} labelled pairs ({labels}) without both a compatible and an "
            "incompatible one; a one-sided cosine loss would collapse the embedding space"
        )
    before = recall(base)
    logger(
        f"held-out recall@10 before: global {before['global']['recall@10']}, gaussian {before['gaussian']['recall@10']}"
    )

    out_root = model_dir(cfg, "matching_embedding")
    settings = dict(
        epochs=int(e.get("epochs", 1)),
        lr=float(e.get("lr", 2e-5)),
        batch_size=int(e.get("batch_size", 16)),
        max_tokens=min(base.window, int(e.get("max_tokens", 256))),
        eval_share=float(e.get("eval_share", 0.1)),
        seed=seed,
        checkpoint_every=int(e.get("checkpoint_every", 100)),
        max_steps=e.get("max_steps"),
        time_budget_s=e.get("time_budget_s"),
        logger=logger,
    )
    round1 = train_embedder(base.path, pairs, out_root / "round1", **settings)
    _require_finished("matching_embedding", round1)
    reports = {"round1": round1}
    final_dir = Path(round1.model_dir)
    if e.get("round_two", True):
        # The labelled chunk: the local vector of the paragraph that the round-one model finds closest.
        tuned = Embedder(str(final_dir))
        pooled = tuned.embed_documents([p[1] for p in pairs], K, sigma, alpha)
        qv = tuned.embed_texts([p[0] for p in pairs])
        chunk_of = [int(np.argmax(doc.vectors[1:] @ q)) + 1 for doc, q in zip(pooled, qv, strict=True)]
        round2 = train_embedder(final_dir, pairs, out_root / "round2", chunk=(K, sigma), chunk_of=chunk_of, **settings)
        _require_finished("matching_embedding", round2)
        reports["round2"] = round2
        final_dir = Path(round2.model_dir)
    after = recall(Embedder(str(final_dir)))
    logger(
        f"held-out recall@10 after: global {after['global']['recall@10']}, gaussian {after['gaussian']['recall@10']}"
    )
    # A profile with `matching_threshold: calibrated` reads this beside the embedder's weights.
    calibrated = {"threshold": after["threshold"]["proposed_threshold"], "measured_on": "held-out articles"}
    tmp = final_dir / f".{CALIBRATED_THRESHOLD_FILE}.tmp"
    tmp.write_text(
        json.dumps(calibrated | after["threshold"] | {"heldout_articles": list(distill.HELDOUT_ARTICLES)}, indent=1),
        encoding="utf-8",
    )
    tmp.replace(final_dir / CALIBRATED_THRESHOLD_FILE)
    series = {f"{name} train": r.losses for name, r in reports.items()}
    series |= {f"{name} held-out": r.eval_losses for name, r in reports.items()}
    return _train_result(
        cfg,
        "matching_embedding",
        reports.get("round2", round1),  # its model_dir is the final model
        rows_in,
        series,
        label_rejections,
        llm=label_llm,
        labels=labels,
        label_balance={"compatible": int(sum(p[2] for p in pairs)), "incompatible": int(sum(1 - p[2] for p in pairs))},
        heldout_recall_before={k: before[k] for k in ("global", "gaussian")},
        heldout_recall_after={k: after[k] for k in ("global", "gaussian")},
        calibrated_threshold={"before": before["threshold"], "after": after["threshold"]},
        heldout_articles=list(distill.HELDOUT_ARTICLES),
        rounds={name: r.as_dict() | {"losses": None} for name, r in reports.items()},
    )


# ------------------------------------------------------------------------------------ students vs raw


def compare_students(
    baseline: Config,
    student: Config,
    queries_per_source: int = 20,
    paragraphs: int = 30,
    logger: Logger = log.info,
) -> dict[str, Any]:
    """Held-out comparison of two profiles' genericizer and instantiator on inputs no training used.

    Genericizer: share of outputs on held-out queries that pass the validator. Instantiator: on the
    held-out SQuAD articles' paragraphs, each paired with its best-matching seed template (the same pairs
    for both), the share that passes the excerpt rules, and the share that also scores >= min_score
    under the baseline's judge (one judge for both sides).
    """
    from . import judge
    from .embed import Embedder
    from .stages import ProgressReporter, instantiation_request, llm_for

    report: dict[str, Any] = {}
    queries = distill.heldout_queries(baseline.root, queries_per_source)
    docs = distill.heldout_paragraphs(
        baseline.root / str((_settings(baseline).get("embedding") or {}).get("paragraphs", "")), paragraphs
    )
    bank = distill.load_genericizer_seeds().drop_duplicates("template")
    emb = Embedder(baseline.embedder)
    sims = emb.embed_texts(list(docs["text"])) @ emb.embed_texts(list(bank["description"])).T
    pairs = docs.assign(template=[bank["template"].iloc[int(np.argmax(s))] for s in sims])
    ins = baseline.instantiation
    window_chars = int(ins.get("window_chars", 1200))
    min_score = int(baseline.judge.get("min_score", 4))
    judge_spec = baseline.models["judge"]
    for name, cfg in (("baseline", baseline), ("student", student)):
        reqs = genericize_requests(cfg, queries["query"])
        results = llm_for(cfg, "genericize").generate(reqs, progress=ProgressReporter(f"{name} genericize", logger))
        # The pipeline's own parser and validator decide what passes.
        kept, _ = genericize.genericize_results(queries.assign(query_id=queries.index.astype(str)), results)
        passed = queries.index.astype(str).isin(kept["query_id"])
        by_source = queries.assign(ok=passed).groupby("source")["ok"].mean().round(3).to_dict()

        s = cfg.models["instantiate"]
        windows = [instantiate.document_window(t, 0, window_chars)[1] for t in pairs["text"]]
        reqs = [instantiation_request(cfg, t, w) for t, w in zip(pairs["template"], windows, strict=True)]
        results = llm_for(cfg, "instantiate").generate(reqs, progress=ProgressReporter(f"{name} instantiate", logger))
        checks = [
            instantiate.check_instantiation(
                t,
                w,
                r.text if not r.error else "",
                0,
                float(ins.get("min_excerpt_ratio", 0.8)),
                int(ins.get("max_span_chars", 4000)),
                int(ins.get("min_answer_words", 0)),
            )
            for t, w, r in zip(pairs["template"], windows, results, strict=True)
        ]
        ok = [c for c in checks if c.status == "ok" and c.parsed is not None and c.expansion is not None]
        jreqs = [
            judge.build_request(
                c.parsed.instruction,
                c.expansion.text,
                judge_spec.model,
                judge_spec.max_new_tokens,
                _constrained(judge_spec, baseline.judge.get("constrained_score", True)),
                judge_spec.prompt_format,
            )
            for c in ok
        ]
        scores = [judge.parse_output(r.text) for r in llm_for(baseline, "judge").generate(jreqs)] if jreqs else []
        accepted = sum(1 for sc in scores if sc and sc[0] >= min_score)
        statuses = pd.Series([c.status for c in checks]).value_counts().to_dict()
        report[name] = {
            "genericizer": {
                "model": cfg.models["genericize"].model,
                "queries": len(queries),
                "valid_share": round(float(np.mean(passed)), 3) if len(passed) else 0.0,
                "valid_share_by_source": by_source,
            },
            "instantiator": {
                "model": s.model,
                "pairs": len(pairs),
                "excerpt_rule_share": round(len(ok) / len(pairs), 3) if len(pairs) else 0.0,
                "excerpt_rule_and_judge_share": round(accepted / len(pairs), 3) if len(pairs) else 0.0,
                "status_counts": {str(k): int(v) for k, v in statuses.items()},
            },
        }
        logger(f"{name}: {report[name]}")
    return report
