"""The method's pipeline stages, each one function from its inputs in the lake to its output there.

A stage takes a `StageContext` (config, partition, the active partitions, a logger) and returns
`ctx.finish(...)`, which writes its output, rejections and accounting. Which stages exist, how they are
partitioned and what they read is declared once, in `registry.py`; the Dagster layer, the CLI and the
tests all run these functions through it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from . import budget, gates, genericize, instantiate, judge, judge_eval, match, sft_export
from .embed import Embedder
from .ids import content_id
from .index import describe_index, load_index, resolve_factory, search, write_index_from_batches
from .io.catalog import stats
from .io.lake import UNPARTITIONED, Lake
from .io.readers import Record, Rejected, read_corpus_records, read_query_source
from .llm_requests import genericize_requests, instantiation_requests, judge_request
from .plots import svg_markdown
from .queries import Decontaminator, build_query_set, load_eval_questions, load_unsafe_patterns
from .shards import get_shard
from .stage_base import ProgressReporter, StageContext, StageResult
from .template_sources import load_template_source

# ----------------------------------------------------------------------------------------- queries


def raw_queries(ctx: StageContext) -> StageResult:
    """One query source read in its own format; unreadable records kept as rejections. A template
    source has no queries (its templates are read by template_bank): its partition here is empty."""
    cfg = ctx.cfg
    cols = ["query_id", "source", "file", "record", "text"]
    rej_cols = ["source", "file", "record", "reason", "detail", "snippet"]
    if cfg.template_source(ctx.partition) is not None:
        return ctx.finish(pd.DataFrame(columns=cols), pd.DataFrame(columns=rej_cols), 0, template_source=True)
    source = cfg.source(ctx.partition)
    rows, rejected = [], []
    for item in read_query_source(source, cfg.root, limit=cfg.limit("queries_per_source")):
        if isinstance(item, Rejected):
            rejected.append(
                {
                    "source": source.name,
                    "file": item.file,
                    "record": item.index,
                    "reason": item.reason,
                    "detail": item.detail,
                    "snippet": item.snippet,
                }
            )
        else:
            rows.append(
                {
                    "query_id": content_id("q", source.name, item.file, item.index, item.text),
                    "source": source.name,
                    "file": item.file,
                    "record": item.index,
                    "text": item.text,
                }
            )
    out = pd.DataFrame(rows, columns=cols)
    rej = pd.DataFrame(rejected, columns=rej_cols)
    return ctx.finish(out, rej, len(rows) + len(rejected))


def query_set(ctx: StageContext) -> StageResult:
    """Normalized, deduplicated, length-bounded, unsafe-filtered, decontaminated queries."""
    raw = ctx.lake.read("raw_queries", ctx.partition)
    f = ctx.cfg.query_filters
    eval_paths = [ctx.cfg.path(p) for p in f.eval_sets]
    deco = Decontaminator(load_eval_questions(eval_paths), n=f.ngram) if eval_paths else None
    out, rej = build_query_set(raw, f.min_chars, f.max_chars, load_unsafe_patterns(f.unsafe_patterns), deco)
    return ctx.finish(out, rej, len(raw))


def template_bank(ctx: StageContext) -> StageResult:
    """Each query genericized by the LLM into a validated template and its document description; a
    template source's partition is its ready bank instead, each row through the same validation."""
    source = ctx.cfg.template_source(ctx.partition)
    if source is not None:
        out, rej, rows_in = load_template_source(source, ctx.cfg.root)
        return ctx.finish(out, rej, rows_in, template_source=source.name)
    queries = ctx.lake.read("query_set", ctx.partition)
    results, stats = ctx.run_llm("genericize", genericize_requests(ctx.cfg, queries["query"]))
    out, rej = genericize.genericize_results(queries, results)
    return ctx.finish(out, rej, len(queries), llm=stats)


def template_index(ctx: StageContext) -> StageResult:
    """Every valid template of the active query sources, deduplicated, its description embedded and
    indexed in FAISS (exact for small banks, a compressed index for large ones)."""
    cfg, lake, logger = ctx.cfg, ctx.lake, ctx.logger
    bank = lake.read_all("template_bank", ctx.sources)
    if bank.empty:
        raise ValueError("the template bank is empty: no valid template in any query source")
    # The same template text from several queries or sources is indexed once (first one wins).
    bank = bank.sort_values(["source", "template_id"]).reset_index(drop=True)
    dup = bank.duplicated("template_id", keep="first")
    rej = bank[dup].assign(reason="duplicate_template", detail="same template and description already indexed")
    bank = bank[~dup].reset_index(drop=True)
    m = cfg.matching
    embedder = Embedder(cfg.embedder)
    descriptions = list(bank["description"])
    n, batch = len(descriptions), m.embed_batch
    exact_below, factory = m.exact_below, m.index_factory
    spec = resolve_factory(n, embedder.dim, exact_below, factory)
    train_sample = None
    if spec != "Flat":
        # The bank is sorted by source: train the quantizer on a random sample, not on the first rows.
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(n, size=min(n, m.train_size), replace=False))
        train_sample = embedder.embed_texts([descriptions[i] for i in pick])

    def batches():
        """Embeddings are produced and added batch by batch; the whole bank is never held twice."""
        for i in range(0, n, batch):
            yield embedder.embed_texts(descriptions[i : i + batch])
            logger(f"template_index: {min(i + batch, n)}/{n} descriptions embedded")

    index = write_index_from_batches(
        batches(),
        embedder.dim,
        n,
        cfg.lake_dir / "template_index" / "index.faiss",
        exact_below,
        factory,
        m.nprobe,
        k_factor=m.k_factor,
        train_sample=train_sample,
    )
    bank = bank.assign(index_row=np.arange(len(bank)))
    return ctx.finish(
        bank,
        rej[["template_id", "source", "reason", "detail"]],
        len(bank) + len(rej),
        index=describe_index(index),
        factory=spec,
        embedder=embedder.identity,
    )


# --------------------------------------------------------------------------------------- documents


def documents(ctx: StageContext) -> StageResult:
    """One shard of a corpus; unreadable, empty, oversized or duplicate documents kept as rejections."""
    cfg, shard_key = ctx.cfg, ctx.partition
    shard = get_shard(cfg, shard_key)
    corpus = cfg.corpus(shard.corpus)
    max_chars = cfg.max_document_chars
    rows, rejected = [], []
    for seg in shard.segments:
        for item in read_corpus_records(corpus, cfg.root / seg.file, cfg.root, seg.start, seg.stop, max_chars):
            if isinstance(item, Rejected):
                rejected.append(
                    {
                        "corpus": corpus.name,
                        "shard": shard_key,
                        "file": item.file,
                        "record": item.index,
                        "reason": item.reason,
                        "detail": item.detail,
                        "snippet": item.snippet,
                    }
                )
            else:
                assert isinstance(item, Record)
                rows.append(
                    {
                        "document_id": content_id(
                            "doc", corpus.name, item.key or f"{item.file}#{item.index}", item.text
                        ),
                        "corpus": corpus.name,
                        "shard": shard_key,
                        "file": item.file,
                        "record": item.index,
                        "doc_key": item.key,
                        "title": item.title,
                        "text": item.text,
                        "n_chars": len(item.text),
                        "metadata": None
                        if item.metadata is None
                        else json.dumps(item.metadata, default=str, ensure_ascii=False),
                    }
                )
    out = pd.DataFrame(
        rows,
        columns=["document_id", "corpus", "shard", "file", "record", "doc_key", "title", "text", "n_chars", "metadata"],
    )
    dup = out.duplicated("document_id")
    if dup.any():
        extra = out[dup].assign(
            reason="duplicate_document",
            detail="identical key and text earlier in the shard",
            snippet=lambda d: d["text"].str[:200],
        )
        rejected.extend(extra[["corpus", "shard", "file", "record", "reason", "detail", "snippet"]].to_dict("records"))
        out = out[~dup]
    rej = pd.DataFrame(rejected, columns=["corpus", "shard", "file", "record", "reason", "detail", "snippet"])
    return ctx.finish(out, rej, len(out) + len(rej))


def document_index(ctx: StageContext) -> StageResult:
    """K+1 Gaussian-pooled vectors per document over its whole token sequence."""
    shard_key, logger = ctx.partition, ctx.logger
    docs = ctx.lake.read("documents", shard_key)
    m = ctx.cfg.matching
    K, sigma, alpha = m.k, m.sigma, m.alpha
    embedder = Embedder(ctx.cfg.embedder)
    progress = ProgressReporter(f"document_index[{shard_key}]", logger, unit="windows embedded")
    pooled = embedder.embed_documents(
        list(docs["text"]), K, sigma, alpha, progress=progress, min_width=m.min_local_width
    )
    out = pd.DataFrame(
        {
            "document_id": docs["document_id"].to_numpy(),
            "corpus": docs["corpus"].to_numpy(),
            "n_tokens": [p.n_tokens for p in pooled],
            "n_windows": [p.n_windows for p in pooled],
            "chunk_char_centers": [p.chunk_char_centers for p in pooled],
            "vectors": [p.vectors.tolist() for p in pooled],
        }
    )
    rej = pd.DataFrame(columns=["document_id", "reason", "detail"])
    return ctx.finish(
        out,
        rej,
        len(docs),
        k=K,
        sigma=sigma,
        min_local_width=m.min_local_width,
        alpha=alpha,
        embedder=embedder.identity,
        max_windows=int(out["n_windows"].max()) if len(out) else 0,
    )


def template_matches(ctx: StageContext) -> StageResult:
    """Up to max_templates complexity-weighted templates per document above the similarity threshold."""
    cfg, lake = ctx.cfg, ctx.lake
    docs = lake.read("document_index", ctx.partition)
    templates = lake.read("template_index").sort_values("index_row").reset_index(drop=True)
    m = cfg.matching
    index = load_index(cfg.lake_dir / "template_index" / "index.faiss", nprobe=m.nprobe, k_factor=m.k_factor)
    threshold = cfg.matching_threshold()
    k = m.candidates_per_vector
    if docs.empty:
        sims = ids = np.zeros((0, 0, 0))
    else:
        vecs = np.stack([np.asarray(v.tolist(), dtype=np.float32) for v in docs["vectors"]])  # (n, K+1, d)
        n, kk, d = vecs.shape
        s, i = search(index, vecs.reshape(n * kk, d), k)
        sims, ids = s.reshape(n, kk, -1), i.reshape(n, kk, -1)
    target_sources = m.target_complexity_sources
    target = templates[templates["source"].isin(target_sources)]["complexity"].tolist() if target_sources else []
    weights = match.complexity_weights(templates["complexity"].tolist(), target)
    out, rej = match.match_documents(docs, templates, sims, ids, weights, threshold, m.max_templates, m.seed)
    return ctx.finish(
        out,
        rej,
        len(docs),
        rows_out=out["document_id"].nunique() if len(out) else 0,
        matches=len(out),
        threshold=threshold,
    )


def instruction_pairs(ctx: StageContext) -> StageResult:
    """Each match instantiated by the LLM; its excerpts expanded and verified against the document."""
    lake = ctx.lake
    matches = lake.read("template_matches", ctx.partition)
    docs = lake.read("documents", ctx.partition).set_index("document_id")
    templates = lake.read("template_index").set_index("template_id")
    starts, _, reqs = instantiation_requests(ctx.cfg, matches, docs["text"], templates["template"])
    ins = ctx.cfg.instantiation
    results, stats = ctx.run_llm("instantiate", reqs)
    out, rej = instantiate.instantiate_results(
        matches.assign(template=[templates.at[t, "template"] for t in matches["template_id"]]),
        docs["text"].to_dict(),
        starts,
        results,
        ins.min_excerpt_ratio,
        ins.max_span_chars,
        ins.min_answer_words,
    )
    return ctx.finish(out, rej, len(matches), llm=stats)


def judged_corpus(ctx: StageContext) -> StageResult:
    """The gates (`gates.py`), then the judge (Flow Judge format) on the pairs that pass them; a pair is
    kept when every enabled gate passes and its score >= min_score."""
    cfg, lake = ctx.cfg, ctx.lake
    pairs = lake.read("instruction_pairs", ctx.partition)
    docs = lake.read("documents", ctx.partition).set_index("document_id")["text"]
    templates = lake.read("template_index").set_index("template_id")["template"]
    g, min_score = cfg.gates, cfg.min_score
    embed = Embedder(cfg.embedder).embed_texts
    labelled = judge_eval.load_labelled_pairs(cfg.path(cfg.judge.labelled_set)) if cfg.judge.labelled_set else None
    dev = [p for p in labelled or () if p.split == "dev"]
    threshold = judge_eval.relevance_threshold(g, dev, embed) if g.relevance else float("nan")
    outcomes = gates.evaluate_all(
        list(pairs["instruction"]),
        list(pairs["answer"]),
        [templates.get(t) for t in pairs["template_id"]],
        [docs.get(d, "") for d in pairs["document_id"]],
        embed,
        g,
        threshold,
    )
    passed = np.array([o.reason is None for o in outcomes], dtype=bool)
    to_judge = pairs[passed].reset_index(drop=True)
    reqs = [judge_request(cfg, i, a) for i, a in zip(to_judge["instruction"], to_judge["answer"], strict=True)]
    results, stats = ctx.run_llm("judge", reqs)
    out, rej = judge.judge_results(to_judge, results, min_score)
    gated = judge.gate_rejections(pairs[~passed], [o for o, ok in zip(outcomes, passed, strict=True) if not ok])
    rej = pd.concat([rej, gated], ignore_index=True) if len(gated) else rej
    relevance = dict(zip(pairs["pair_id"], (o.relevance for o in outcomes), strict=True))
    out = out.assign(relevance=[relevance[p] for p in out["pair_id"]])
    rej = rej.assign(relevance=[relevance[p] for p in rej["pair_id"]])
    scores = pd.concat([out["score"], rej["score"]]).dropna().astype(int).value_counts().sort_index()
    extra = {}
    if dev:
        # The judge on the labelled dev split: does its score separate the labels? (cached after once)
        shown = dev[: cfg.judge.labelled_plot_rows]
        dev_results, _ = ctx.run_llm("judge", [judge_request(cfg, p.instruction, p.answer) for p in shown])
        dist = judge_eval.score_distribution(shown, [judge.result_score(r) for r in dev_results])
        extra = {
            "labelled_scores": dist,
            "labelled_scores_plot": svg_markdown(judge_eval.score_distribution_svg(dist)),
        }
    return ctx.finish(
        out,
        rej,
        len(pairs),
        llm=stats,
        score_histogram={str(k): int(v) for k, v in scores.items()},
        gates={k: getattr(g, k) for k in gates.ORDER},
        relevance_threshold=None if np.isnan(threshold) else round(threshold, 4),
        min_score=min_score,
        **extra,
    )


def training_corpus(ctx: StageContext) -> StageResult:
    """Kept pairs of every active shard, token-budgeted per document, as pre-training text; exported
    as Parquet and JSONL."""
    cfg, lake, shards = ctx.cfg, ctx.lake, ctx.shards
    judged = lake.read_all("judged_corpus", shards)
    if judged.empty:
        # The judge's own output shape, so an empty training corpus keeps its schema.
        judged, _ = judge.judge_results(pd.DataFrame(columns=instantiate.PAIR_COLUMNS), [], 4)

    doc_index = lake.read_all("document_index", shards)
    doc_tokens = dict(zip(doc_index.get("document_id", []), doc_index.get("n_tokens", []), strict=True))
    embedder_tok = Embedder(cfg.embedder).tokenizer
    tr = cfg.budget

    def count(text: str) -> int:
        return len(embedder_tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    out, rej = budget.apply_budget(
        judged,
        doc_tokens,
        count,
        rollover=tr.rollover,
        budget_ratio=tr.budget_ratio,
    )
    export_dir = cfg.data_dir / "exports"
    export_dir.mkdir(parents=True, exist_ok=True)
    cols = ["pair_id", "document_id", "template_id", "corpus", "text", "tokens", "score"]
    exported = out[cols] if len(out) else pd.DataFrame(columns=cols)
    Lake(export_dir).write("training_corpus", "train", exported)
    tmp = export_dir / ".training_corpus.jsonl.tmp"
    exported.to_json(tmp, orient="records", lines=True, force_ascii=False)
    tmp.replace(export_dir / "training_corpus.jsonl")
    sft_dir = sft_export.write_sft_dataset(out, export_dir / "training_corpus_sft", _card(ctx, len(out)))
    return ctx.finish(
        out.drop(columns=["accepted"], errors="ignore"),
        rej.drop(columns=["accepted"], errors="ignore"),
        len(judged),
        tokens=int(out["tokens"].sum()) if len(out) else 0,
        exports=[
            str(export_dir / "training_corpus" / "train.parquet"),
            str(export_dir / "training_corpus.jsonl"),
            str(sft_dir),
        ],
    )


def _card(ctx: StageContext, rows: int) -> str:
    """The SFT dataset's card, with the accounting of every stage upstream of the training corpus."""
    upstream = ctx.ancestors
    keys = set(ctx.sources) | set(ctx.shards) | {UNPARTITIONED}
    records = [r for r in ctx.lake.all_accounting() if r["partition"] in keys and r["asset"] in upstream]
    return sft_export.dataset_card(ctx.cfg, rows, stats(records, upstream))
