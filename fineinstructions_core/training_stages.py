"""The training assets: what the judged corpus is worth, measured the paper's way.

`trained_model` continues pre-training a base LM on the training corpus's `Instruction: ...\\n\\nAnswer: ...`
texts; `baseline_model` trains the same base, with the same settings and exactly the same number of
tokens, on the raw text of the documents those pairs came from (the paper's control). Both hold out the
same documents for their held-out loss. `model_comparison` asks the base, the baseline and the trained
model closed-book questions about the trained documents and real prompts no query source used, and
tabulates what each knows and how the judge rates its answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import judge, model_eval
from .config import Config, plain
from .ids import content_id
from .llm.models import resolve_llm
from .llm_requests import judge_request
from .plots import svg_markdown
from .pretrain import MIN_TOKENS, PackedData, pack, pick_device, pretrain_causal_lm
from .stage_base import ProgressReporter, StageContext, StageResult
from .training import TrainReport, loss_curve_svg

log = logging.getLogger(__name__)

MODEL_COLUMNS = ("model_id", "model_dir", "base_model", "tokens_seen", "steps", "eval_loss_after")
COMPARISON_COLUMNS = ("model_id", "knowledge_loglik", "knowledge_f1", "instruction_score", "win_rate_vs_baseline")
ROLES = ("base_model", "baseline_model", "trained_model")


def model_dir(cfg: Config, asset: str) -> Path:
    """Where a training asset leaves its model: `<data_dir>/models/<asset>/model` (a profile can name it)."""
    return cfg.data_dir / "models" / asset


# ------------------------------------------------------------------------------------ the shared split


def heldout_documents(document_ids: list[str], share: float, seed: int) -> set[str]:
    """The documents both models hold out: round(n x share) of them, a seeded, order-free choice, never
    all. A corpus of a few documents holds none out (it has no held-out loss) rather than lose the one
    the knowledge questions are about."""
    ids = sorted(set(document_ids), key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    n = min(len(ids) - 1, round(len(ids) * share)) if ids else 0
    return set(ids[:n])


def _heldout(cfg: Config, corpus: pd.DataFrame) -> set[str]:
    p = cfg.pretraining
    return heldout_documents(corpus["document_id"].tolist(), p.heldout_documents, p.seed)


def _base(cfg: Config) -> tuple[Path, str, Any]:
    from transformers import AutoTokenizer

    path, identity = resolve_llm(cfg.pretraining.base_model, cfg.cache_dir)
    return path, identity, AutoTokenizer.from_pretrained(path)


def _token_budget(cfg: Config, corpus: pd.DataFrame, held: set[str], tokenizer: Any) -> int:
    """The tokens both models see: the configured budget, else the training pairs' own count (with EOS)."""
    if cfg.pretraining.token_budget is not None:
        return cfg.pretraining.token_budget
    texts = corpus.loc[~corpus["document_id"].isin(held), "text"].tolist()
    return sum(len(tokenizer(t, add_special_tokens=False, verbose=False).input_ids) + 1 for t in texts)


def _pretrain(
    ctx: StageContext, base: tuple[Path, str, Any], train_texts: list[str], held_texts: list[str], budget: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the base on packed texts: the model table's row and the metadata the asset shows."""
    cfg, p = ctx.cfg, ctx.cfg.pretraining
    base_dir, identity, tokenizer = base
    data: PackedData = pack(
        train_texts, held_texts, tokenizer, sequence_length=p.sequence_length, token_budget=budget, seed=p.seed
    )
    device = pick_device(p.device)
    ctx.logger(
        f"{ctx.name}: {data.tokens} tokens in {len(data.train)} blocks of {data.sequence_length} "
        f"({data.passes}x its {data.data_tokens} tokens of text), on {device}"
    )
    report: TrainReport = pretrain_causal_lm(
        base_dir,
        data,
        model_dir(cfg, ctx.name),
        tokenizer=tokenizer,
        batch_size=p.batch_size,
        lr=p.lr,
        seed=p.seed,
        checkpoint_every=p.checkpoint_every,
        time_budget_s=p.time_budget_s,
        device=device,
        logger=ctx.logger,
    )
    if not report.finished:
        raise TimeoutError(
            f"{ctx.name}: pretraining.time_budget_s ran out at step {report.steps}; the checkpoint is kept, "
            "materialize again to resume"
        )
    seconds = report.seconds or 1e-9
    row = {
        "model_id": content_id("model", ctx.name, identity, report.steps, report.losses[-1:]),
        "model_dir": report.model_dir,
        "base_model": identity,
        "tokens_seen": data.tokens,
        "data_tokens": data.data_tokens,
        "passes_over_data": data.passes,
        "steps": report.steps,
        "sequence_length": data.sequence_length,
        "final_train_loss": report.losses[-1][1] if report.losses else None,
        "eval_loss_before": report.eval_losses[0][1] if report.eval_losses else None,
        "eval_loss_after": report.eval_losses[-1][1] if report.eval_losses else None,
        "seconds": report.seconds,
        "tokens_per_second": round(data.tokens / seconds, 1),
        "device": device,
    }
    extras = {
        "loss_curve": svg_markdown(loss_curve_svg({"train": report.losses, "held-out": report.eval_losses})),
        "train_losses": report.losses,
        "eval_losses": report.eval_losses,
        "resumed_from_step": report.resumed_from_step,
    } | {k: row[k] for k in ("tokens_seen", "steps", "seconds", "tokens_per_second", "device", "base_model")}
    return row, extras


def _no_model(ctx: StageContext, rows: pd.DataFrame, id_column: str, why: str) -> StageResult:
    """No model this time (the judge kept too little): an empty model table whose metadata says why,
    each input row a rejection with that reason, so the run goes on and the accounting balances."""
    ctx.logger(f"{ctx.name}: no model trained: {why}")
    rej = pd.DataFrame(
        {id_column: rows[id_column].tolist() if len(rows) else [], "reason": "too_little_text_to_train", "detail": why}
    )
    return ctx.finish(pd.DataFrame(columns=list(MODEL_COLUMNS)), rej, len(rows), skipped=why)


def _too_little(corpus: pd.DataFrame, budget: int) -> str | None:
    if corpus.empty:
        return "the training corpus is empty: the judge accepted no pairs (see judged_corpus's rejections)"
    if budget < MIN_TOKENS:
        return f"the training pairs hold {budget} tokens, fewer than the {MIN_TOKENS} one block needs"
    return None


def _model_stage(
    ctx: StageContext,
    corpus: pd.DataFrame,
    rows: pd.DataFrame,
    id_column: str,
    rejected: pd.DataFrame,
    rows_in: int,
    rows_out: int,
) -> StageResult:
    """Both models' stage: `rows` (one per pair or per document) give their `text`, split by the held-out
    documents; the token budget is the training corpus's either way."""
    held = _heldout(ctx.cfg, corpus)
    base = _base(ctx.cfg)
    budget = _token_budget(ctx.cfg, corpus, held, base[2])
    why = _too_little(corpus, budget)
    if why:
        return _no_model(ctx, rows, id_column, why)
    is_held = rows["document_id"].isin(held)
    row, extras = _pretrain(ctx, base, rows.loc[~is_held, "text"].tolist(), rows.loc[is_held, "text"].tolist(), budget)
    row |= {
        "train_documents": rows.loc[~is_held, "document_id"].nunique(),
        "heldout_documents": rows.loc[is_held, "document_id"].nunique(),
    }
    return ctx.finish(pd.DataFrame([row]), rejected, rows_in, rows_out=rows_out, **extras)


def trained_model(ctx: StageContext) -> StageResult:
    """The base LM continued-pretrained on the training corpus's texts (loss on every token)."""
    corpus = ctx.lake.read("training_corpus")
    none = pd.DataFrame(columns=["reason", "detail"])
    return _model_stage(ctx, corpus, corpus, "pair_id", none, len(corpus), len(corpus))


def baseline_model(ctx: StageContext) -> StageResult:
    """The same base, settings and number of tokens, on the raw text of the documents the pairs came from."""
    corpus = ctx.lake.read("training_corpus")
    wanted = set(corpus["document_id"])
    docs = ctx.lake.read_all("documents", ctx.shards)
    if docs.empty:
        docs = pd.DataFrame(columns=["document_id", "text"])
    docs = docs[docs["document_id"].isin(wanted)].sort_values("document_id")
    missing = wanted - set(docs["document_id"])
    rej = pd.DataFrame(
        [
            {"document_id": d, "reason": "document_not_in_lake", "detail": "its shard is no longer active"}
            for d in missing
        ],
        columns=["document_id", "reason", "detail"],
    )
    return _model_stage(ctx, corpus, docs, "document_id", rej, len(wanted), len(docs))


# ------------------------------------------------------------------------------------ the comparison


def _jsonl(path: Path, label: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records of a JSONL file and a rejection for each line that is not a JSON object."""
    if not path.exists():
        raise FileNotFoundError(f"comparison.{label}: {path} does not exist")
    rows, rejected = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                rejected.append(
                    {"kind": label, "item": f"{path.name}:{n}", "reason": "unreadable_record", "detail": str(exc)}
                )
                continue
            if not isinstance(rec, dict):
                rejected.append(
                    {
                        "kind": label,
                        "item": f"{path.name}:{n}",
                        "reason": "unreadable_record",
                        "detail": "not an object",
                    }
                )
                continue
            rows.append(rec | {"_line": n})
    return rows, rejected


def knowledge_items(ctx: StageContext, trained_docs: set[str]) -> tuple[pd.DataFrame, list[dict[str, Any]], int]:
    """Closed-book questions whose document was trained on, with their references; the rejected ones;
    how many questions were about other documents (out of scope, not items)."""
    c = ctx.cfg.comparison
    cols = ["item", "question", "document_id", "references", "reference_kind"]
    if not c.knowledge_questions:
        return pd.DataFrame(columns=cols), [], 0
    path = ctx.cfg.path(c.knowledge_questions)
    records, rejected = _jsonl(path, "knowledge_questions")
    docs = ctx.lake.read_all("documents", ctx.shards)
    docs = docs[docs["document_id"].isin(trained_docs)]
    by_key = {str(k): (d, t) for k, d, t in zip(docs["doc_key"], docs["document_id"], docs["text"], strict=True)}
    items, other = [], 0
    for rec in records:
        key, question = rec.get(c.document_field), rec.get(c.question_field)
        item = f"{path.name}:{rec['_line']}"
        if str(key) not in by_key:
            other += 1
            continue
        if not isinstance(question, str) or not question.strip():
            rejected.append({"kind": "knowledge_questions", "item": item, "reason": "no_question", "detail": ""})
            continue
        document_id, text = by_key[str(key)]
        answers = rec.get(c.answers_field)
        gold = (
            [a if isinstance(a, str) else str(a.get("text", "")) for a in answers] if isinstance(answers, list) else []
        )
        gold = [a for a in gold if a.strip()]
        refs, kind = (gold, "gold") if gold else ([model_eval.evidence_sentence(question, text)], "evidence_sentence")
        items.append(
            {
                "item": item,
                "question": question.strip(),
                "document_id": document_id,
                "references": refs,
                "reference_kind": kind,
            }
        )
    out = pd.DataFrame(items, columns=cols)
    if len(out) > c.max_questions:
        out = out.sample(n=c.max_questions, random_state=c.seed).sort_index()
    return out.reset_index(drop=True), rejected, other


def instruction_prompts(ctx: StageContext) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Real prompts no query source read (those it read are counted out), at most max_prompts."""
    c = ctx.cfg.comparison
    if not c.instruction_prompts:
        return pd.DataFrame(columns=["item", "prompt"]), []
    path = ctx.cfg.path(c.instruction_prompts)
    records, rejected = _jsonl(path, "instruction_prompts")
    raw = ctx.lake.read_all("raw_queries", ctx.sources)
    used = {" ".join(str(t).split()).lower() for t in raw.get("text", [])}
    items = []
    for rec in records:
        text, item = rec.get(c.prompt_field), f"{path.name}:{rec['_line']}"
        if not isinstance(text, str) or not text.strip():
            rejected.append({"kind": "instruction_prompts", "item": item, "reason": "no_prompt", "detail": ""})
        elif " ".join(text.split()).lower() in used:
            rejected.append(
                {"kind": "instruction_prompts", "item": item, "reason": "used_by_query_source", "detail": ""}
            )
        elif len(text) > c.max_prompt_chars:
            rejected.append(
                {
                    "kind": "instruction_prompts",
                    "item": item,
                    "reason": "prompt_too_long",
                    "detail": f"{len(text)} > {c.max_prompt_chars} chars",
                }
            )
        else:
            items.append({"item": item, "prompt": text.strip()})
    out = pd.DataFrame(items, columns=["item", "prompt"])
    if len(out) > c.max_prompts:  # a seeded sample; the rest are not items (nothing is wrong with them)
        out = out.sample(n=c.max_prompts, random_state=c.seed).sort_index()
    return out.reset_index(drop=True), rejected


def _ask(
    role: str,
    model_path: Path,
    knowledge: pd.DataFrame,
    prompts: pd.DataFrame,
    cfg: Config,
    device: str,
    logger: Callable[[str], None],
) -> dict[str, Any]:
    c = cfg.comparison
    lm = model_eval.CausalLM(model_path, device)

    def progress(what: str) -> ProgressReporter:
        return ProgressReporter(f"model_comparison: {role} {what}", logger, unit="answers")

    def answer(questions: list[str], what: str) -> list[str]:
        return lm.greedy(questions, c.max_new_tokens, c.batch_size, c.min_new_tokens, progress(what))

    k_prompts = [model_eval.prompt(q) for q in knowledge["question"]]
    refs = knowledge["references"].tolist()
    loglik, k_answers = [], []
    if len(knowledge):
        loglik = lm.answer_logprob(k_prompts, [r[0] for r in refs], c.batch_size, progress("reference likelihoods"))
        k_answers = answer(k_prompts, "knowledge answers")
    i_answers = answer([model_eval.prompt(p) for p in prompts["prompt"]], "prompt answers")
    lm.close()
    return {"loglik": loglik, "knowledge_answers": k_answers, "instruction_answers": i_answers}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (the README and the asset's metadata show the same one)."""
    head = (
        "| model | knowledge: answer log-likelihood / token | knowledge: F1 | knowledge: EM "
        "| instruction following: judge score (1-5) | win rate vs baseline |"
    )
    lines = [head, "|---|---|---|---|---|---|"]

    def f(v: Any, pct: bool = False) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"

    for r in rows:
        lines.append(
            f"| {r['model_id']} | {f(r['knowledge_loglik'])} | {f(r['knowledge_f1'])} | {f(r['knowledge_em'])} | "
            f"{f(r['instruction_score'])} | {f(r['win_rate_vs_baseline'], pct=True)} |"
        )
    return "\n".join(lines)


def _bars_svg(rows: list[dict[str, Any]], width: int = 480, height: int = 200) -> str:
    """One group of bars per metric, one bar per model, each metric scaled to its own maximum."""
    metrics = [("knowledge_f1", "F1"), ("instruction_score", "judge"), ("win_rate_vs_baseline", "win rate")]
    colours = ("#999999", "#4c78a8", "#f58518")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10">']
    group = width / len(metrics)
    for g, (key, label) in enumerate(metrics):
        values = [r.get(key) or 0.0 for r in rows]
        top = max(values) or 1.0
        for b, (v, r) in enumerate(zip(values, rows, strict=True)):
            h = (height - 40) * v / top
            x = g * group + 10 + b * (group - 20) / len(rows)
            parts.append(
                f'<rect x="{x:.1f}" y="{height - 20 - h:.1f}" width="{(group - 30) / len(rows):.1f}" '
                f'height="{h:.1f}" fill="{colours[b % 3]}"><title>{r["model_id"]}: {v:.3f}</title></rect>'
            )
        parts.append(f'<text x="{g * group + group / 2:.0f}" y="{height - 5}" text-anchor="middle">{label}</text>')
    for b, r in enumerate(rows):
        parts.append(f'<text x="{width - 120}" y="{12 + 12 * b}" fill="{colours[b % 3]}">{r["model_id"]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def model_comparison(ctx: StageContext) -> StageResult:
    """The base, baseline and trained models on closed-book knowledge questions and judged prompts."""
    cfg = ctx.cfg
    corpus = ctx.lake.read("training_corpus")
    held = _heldout(cfg, corpus)
    trained, baseline = ctx.lake.read("trained_model"), ctx.lake.read("baseline_model")
    if trained.empty or baseline.empty:
        why = "no model to compare: trained_model or baseline_model trained nothing (see its metadata)"
        ctx.logger(f"model_comparison: {why}")
        empty = pd.DataFrame(columns=["kind", "item", "reason", "detail"])
        return ctx.finish(pd.DataFrame(columns=list(COMPARISON_COLUMNS)), empty, 0, skipped=why)
    trained_docs = set(corpus["document_id"]) - held
    knowledge, rejected, other = knowledge_items(ctx, trained_docs)
    prompts, prompt_rejected = instruction_prompts(ctx)
    rejected += prompt_rejected
    base_path, base_identity = resolve_llm(cfg.pretraining.base_model, cfg.cache_dir)
    models = {
        "base_model": (base_path, base_identity),
        "baseline_model": (Path(baseline["model_dir"].iloc[0]), ""),
        "trained_model": (Path(trained["model_dir"].iloc[0]), ""),
    }
    device = pick_device(cfg.pretraining.device)
    ctx.logger(f"model_comparison: {len(knowledge)} knowledge questions, {len(prompts)} prompts, 3 models on {device}")
    asked = {role: _ask(role, path, knowledge, prompts, cfg, device, ctx.logger) for role, (path, _) in models.items()}

    # Every model's answer to every prompt is judged; a prompt counts only where all three were scored.
    # An empty answer does not respond to the instruction: the rubric's score 1, without asking the judge.
    roles = list(models)
    pairs = [(r, i) for r in roles for i in range(len(prompts))]
    to_judge = [(r, i) for r, i in pairs if asked[r]["instruction_answers"][i].strip()]
    requests = [judge_request(cfg, prompts["prompt"].iloc[i], asked[r]["instruction_answers"][i]) for r, i in to_judge]
    results, stats = ctx.run_llm("judge", requests) if requests else ([], None)
    verdicts: dict[tuple[str, int], tuple[int | None, str]] = {(r, i): (1, "empty answer") for r, i in pairs}
    for key, res in zip(to_judge, results, strict=True):
        parsed = None if res.error else judge.parse_output(res.text)
        verdicts[key] = parsed if parsed else (None, res.error or res.text[:300])
    scores = {r: [verdicts[(r, i)][0] for i in range(len(prompts))] for r in roles}
    feedback = {r: [verdicts[(r, i)][1] for i in range(len(prompts))] for r in roles}
    empty = {r: sum(not a.strip() for a in asked[r]["instruction_answers"]) for r in roles}
    judged = [i for i in range(len(prompts)) if all(scores[r][i] is not None for r in roles)]
    for i in range(len(prompts)):
        if i not in judged:
            failed = [r for r in roles if scores[r][i] is None]
            rejected.append(
                {
                    "kind": "instruction_prompts",
                    "item": prompts["item"].iloc[i],
                    "reason": "judge_unparseable",
                    "detail": f"no score for {', '.join(failed)}",
                }
            )

    rows, details = [], []
    for role in roles:
        a = asked[role]
        f1 = [
            model_eval.token_f1(ans, ref)
            for ans, ref in zip(a["knowledge_answers"], knowledge["references"], strict=True)
        ]
        em = [
            model_eval.exact_match(ans, ref)
            for ans, ref in zip(a["knowledge_answers"], knowledge["references"], strict=True)
        ]
        s = [scores[role][i] for i in judged]
        base_s = [scores["baseline_model"][i] for i in judged]
        rows.append(
            {
                "model_id": role,
                "model": models[role][1] or str(models[role][0]),
                "knowledge_questions": len(knowledge),
                "knowledge_loglik": _mean(a["loglik"]),
                "knowledge_f1": _mean(f1),
                "knowledge_em": _mean(em),
                "prompts_judged": len(judged),
                "instruction_score": _mean([float(x) for x in s]),
                "win_rate_vs_baseline": _mean([float(x > y) for x, y in zip(s, base_s, strict=True)])
                if role != "baseline_model"
                else None,
                "tie_rate_vs_baseline": _mean([float(x == y) for x, y in zip(s, base_s, strict=True)])
                if role != "baseline_model"
                else None,
                "empty_answers": empty[role] + sum(not x.strip() for x in a["knowledge_answers"]),
            }
        )
        for k, row in enumerate(knowledge.itertuples()):
            details.append(
                {
                    "model_id": role,
                    "kind": "knowledge",
                    "item": row.item,
                    "question": row.question,
                    "references": list(row.references),
                    "reference_kind": row.reference_kind,
                    "answer": a["knowledge_answers"][k],
                    "loglik": a["loglik"][k],
                    "f1": f1[k],
                    "em": em[k],
                }
            )
        for i, p in enumerate(prompts.itertuples()):
            details.append(
                {
                    "model_id": role,
                    "kind": "instruction",
                    "item": p.item,
                    "question": p.prompt,
                    "answer": a["instruction_answers"][i],
                    "score": scores[role][i] if scores[role] else None,
                    "feedback": feedback[role][i] if feedback[role] else "",
                }
            )
    export = cfg.data_dir / "exports" / "model_comparison.jsonl"
    export.parent.mkdir(parents=True, exist_ok=True)
    tmp = export.with_suffix(".tmp")
    pd.DataFrame(details).to_json(tmp, orient="records", lines=True, force_ascii=False)
    tmp.replace(export)
    table = comparison_table(rows)
    kinds = knowledge["reference_kind"].value_counts().to_dict() if len(knowledge) else {}
    rej = pd.DataFrame(rejected, columns=["kind", "item", "reason", "detail"])
    n_prompt_items = len(prompts) + len(prompt_rejected)
    ctx.logger("model_comparison:\n" + table)
    return ctx.finish(
        pd.DataFrame(rows),
        rej,
        rows_in=len(knowledge) + n_prompt_items + sum(1 for r in rejected if r["kind"] == "knowledge_questions"),
        rows_out=len(knowledge) + len(judged),
        llm=stats,
        comparison_table=table,
        comparison_plot=svg_markdown(_bars_svg(rows)),
        reference_kinds=kinds,
        questions_about_other_documents=other,
        answers_export=str(export),
        configuration={
            "pretraining": plain(cfg.pretraining),
            "comparison": plain(cfg.comparison),
            "judge_model": cfg.models["judge"].model,
            "profile": cfg.profile_name,
        },
    )
