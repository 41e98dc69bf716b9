"""Each stage of the method as one call: read inputs from the lake, run the core, write outputs.

The Dagster layer is a thin wrapper over these functions; the CLI and tests can call them directly.
Every stage writes its output, its rejections (with reasons) and its accounting record, and returns a
`StageResult` the orchestration layer turns into metadata and checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import budget, genericize, instantiate, judge, match
from .config import Config, ModelSpec
from .embed import Embedder
from .ids import content_id
from .index import build_index_from_batches, describe_index, load_index, resolve_factory, save_index, search
from .io.lake import UNPARTITIONED, Accounting, Lake, rejection_counts
from .io.readers import Record, Rejected, read_corpus_records, read_query_source
from .llm.backends import make_backend
from .llm.base import GenerationRequest, GenerationResult, LLMStats
from .llm.cache import CachedLLM, RequestCache
from .queries import Decontaminator, build_query_set, load_eval_questions, load_unsafe_patterns
from .shards import get_shard

log = logging.getLogger(__name__)
Logger = Callable[[str], None]


@dataclass
class StageResult:
    asset: str
    partition: str
    output: pd.DataFrame
    rejections: pd.DataFrame
    accounting: Accounting
    llm: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _finish(
    cfg: Config,
    asset: str,
    partition: str,
    out: pd.DataFrame,
    rej: pd.DataFrame,
    rows_in: int,
    unit: str,
    llm: LLMStats | None = None,
    rows_out: int | None = None,
    **extra: Any,
) -> StageResult:
    lake = Lake(cfg.lake_dir)
    lake.write(asset, partition, out)
    lake.write_rejections(asset, partition, rej)
    acc = Accounting(
        asset=asset,
        partition=partition,
        unit=unit,
        rows_in=int(rows_in),
        rows_out=int(len(out) if rows_out is None else rows_out),
        rejected=rejection_counts(rej),
        extra={"llm": llm.as_dict() if llm else None, **extra},
    )
    lake.write_accounting(acc)
    return StageResult(asset, partition, out, rej, acc, llm.as_dict() if llm else None, extra)


# ---------------------------------------------------------------------------------------------- LLM


def _constrained(spec: ModelSpec, section_default: object) -> bool:
    """A profile's stage may switch its grammar off (a server backend cannot apply it) over the section."""
    return bool(section_default) if spec.constrained is None else spec.constrained


def llm_for(cfg: Config, stage: str) -> CachedLLM:
    spec = cfg.models[stage]
    backend = make_backend(spec, cfg.cache_dir)
    return CachedLLM(backend, RequestCache(cfg.request_cache_path), chunk_size=max(spec.batch_size * 4, 16))


class ProgressReporter:
    """done/total, tokens/s and ETA, at most every `every` seconds (and at the end)."""

    def __init__(self, label: str, logger: Logger, every: float = 15.0):
        self.label, self.logger, self.every = label, logger, every
        self.start = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, tokens: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        rate = tokens / elapsed if elapsed > 0 else 0.0
        eta = (elapsed / done * (total - done)) if done else float("nan")
        self.logger(f"{self.label}: {done}/{total} requests, {tokens} new tokens, {rate:.1f} tok/s, ETA {eta:.0f}s")


def _run_llm(
    cfg: Config, stage: str, requests: list[GenerationRequest], logger: Logger
) -> tuple[list[GenerationResult], LLMStats]:
    llm = llm_for(cfg, stage)
    results = llm.generate(requests, progress=ProgressReporter(stage, logger))
    return results, llm.stats


# ----------------------------------------------------------------------------------------- queries


def raw_queries(cfg: Config, source_name: str, logger: Logger = log.info) -> StageResult:
    source = cfg.source(source_name)
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
    out = pd.DataFrame(rows, columns=["query_id", "source", "file", "record", "text"])
    rej = pd.DataFrame(rejected, columns=["source", "file", "record", "reason", "detail", "snippet"])
    return _finish(cfg, "raw_queries", source_name, out, rej, len(rows) + len(rejected), "records")


def query_set(cfg: Config, source_name: str, logger: Logger = log.info) -> StageResult:
    raw = Lake(cfg.lake_dir).read("raw_queries", source_name)
    f = cfg.query_filters
    eval_paths = [cfg.root / p for p in f.get("eval_sets", [])]
    deco = Decontaminator(load_eval_questions(eval_paths), n=int(f.get("ngram", 8))) if eval_paths else None
    out, rej = build_query_set(
        raw,
        int(f.get("min_chars", 8)),
        int(f.get("max_chars", 1000)),
        load_unsafe_patterns(f.get("unsafe_patterns")),
        deco,
    )
    return _finish(cfg, "query_set", source_name, out, rej, len(raw), "queries")


def genericize_requests(cfg: Config, queries: Iterable[str]) -> list[GenerationRequest]:
    """Genericizer requests under `cfg`'s genericize model and prompt format."""
    spec = cfg.models["genericize"]
    return [
        genericize.build_request(q, spec.model, spec.max_new_tokens, spec.temperature, spec.prompt_format)
        for q in queries
    ]


def template_bank(cfg: Config, source_name: str, logger: Logger = log.info) -> StageResult:
    queries = Lake(cfg.lake_dir).read("query_set", source_name)
    results, stats = _run_llm(cfg, "genericize", genericize_requests(cfg, queries["query"]), logger)
    out, rej = genericize.genericize_results(queries, results)
    return _finish(cfg, "template_bank", source_name, out, rej, len(queries), "queries", llm=stats)


def template_index(cfg: Config, sources: list[str], logger: Logger = log.info) -> StageResult:
    lake = Lake(cfg.lake_dir)
    bank = lake.read_all("template_bank", sources)
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
    n, batch = len(descriptions), int(m.get("embed_batch", 4096))
    exact_below, factory = int(m.get("exact_below", 100_000)), m.get("index_factory")
    spec = resolve_factory(n, embedder.dim, exact_below, factory)
    train_sample = None
    if spec != "Flat":
        # The bank is sorted by source: train the quantizer on a random sample, not on the first rows.
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(n, size=min(n, int(m.get("train_size", 131_072))), replace=False))
        train_sample = embedder.embed_texts([descriptions[i] for i in pick])

    def batches():
        """Embeddings are produced and added batch by batch; the whole bank is never held twice."""
        for i in range(0, n, batch):
            yield embedder.embed_texts(descriptions[i : i + batch])
            logger(f"template_index: {min(i + batch, n)}/{n} descriptions embedded")

    index = build_index_from_batches(
        batches(), embedder.dim, n, exact_below, factory, int(m.get("nprobe", 16)), train_sample=train_sample
    )
    save_index(index, cfg.lake_dir / "template_index" / "index.faiss")
    bank = bank.assign(index_row=np.arange(len(bank)))
    return _finish(
        cfg,
        "template_index",
        UNPARTITIONED,
        bank,
        rej[["template_id", "source", "reason", "detail"]],
        len(bank) + len(rej),
        "templates",
        index=describe_index(index),
        factory=spec,
        embedder=embedder.identity,
    )


# --------------------------------------------------------------------------------------- documents


def documents(cfg: Config, shard_key: str, logger: Logger = log.info) -> StageResult:
    shard = get_shard(cfg, shard_key)
    corpus = cfg.corpus(shard.corpus)
    max_chars = int(cfg.raw.get("max_document_chars", 5_000_000))
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
                    }
                )
    out = pd.DataFrame(
        rows, columns=["document_id", "corpus", "shard", "file", "record", "doc_key", "title", "text", "n_chars"]
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
    return _finish(cfg, "documents", shard_key, out, rej, len(out) + len(rej), "records")


def document_index(cfg: Config, shard_key: str, logger: Logger = log.info) -> StageResult:
    docs = Lake(cfg.lake_dir).read("documents", shard_key)
    m = cfg.matching
    K, sigma, alpha = int(m.get("k", 5)), float(m.get("sigma", 0.05)), float(m.get("alpha", 1.0))
    embedder = Embedder(cfg.embedder)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 15 or done == total:
            last[0] = time.perf_counter()
            logger(f"document_index[{shard_key}]: {done}/{total} windows embedded")

    pooled = embedder.embed_documents(list(docs["text"]), K, sigma, alpha, progress=progress)
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
    return _finish(
        cfg,
        "document_index",
        shard_key,
        out,
        rej,
        len(docs),
        "documents",
        k=K,
        sigma=sigma,
        alpha=alpha,
        embedder=embedder.identity,
        max_windows=int(out["n_windows"].max()) if len(out) else 0,
    )


def template_matches(cfg: Config, shard_key: str, logger: Logger = log.info) -> StageResult:
    lake = Lake(cfg.lake_dir)
    docs = lake.read("document_index", shard_key)
    templates = lake.read("template_index").sort_values("index_row").reset_index(drop=True)
    m = cfg.matching
    index = load_index(cfg.lake_dir / "template_index" / "index.faiss", nprobe=int(m.get("nprobe", 16)))
    threshold = cfg.matching_threshold()
    k = int(m.get("candidates_per_vector", 32))
    if docs.empty:
        sims = ids = np.zeros((0, 0, 0))
    else:
        vecs = np.stack([np.asarray(v.tolist(), dtype=np.float32) for v in docs["vectors"]])  # (n, K+1, d)
        n, kk, d = vecs.shape
        s, i = search(index, vecs.reshape(n * kk, d), k)
        sims, ids = s.reshape(n, kk, -1), i.reshape(n, kk, -1)
    target_sources = m.get("target_complexity_sources") or []
    target = templates[templates["source"].isin(target_sources)]["complexity"].tolist() if target_sources else []
    weights = match.complexity_weights(templates["complexity"].tolist(), target)
    out, rej = match.match_documents(
        docs, templates, sims, ids, weights, threshold, int(m.get("max_templates", 6)), int(m.get("seed", 0))
    )
    return _finish(
        cfg,
        "template_matches",
        shard_key,
        out,
        rej,
        len(docs),
        "documents",
        rows_out=out["document_id"].nunique() if len(out) else 0,
        matches=len(out),
        threshold=threshold,
    )


def instantiation_requests(
    cfg: Config, matches: pd.DataFrame, texts: pd.Series, templates: pd.Series
) -> tuple[list[int], list[str], list[GenerationRequest]]:
    """(window starts, windows, requests) for template matches: each request reads the window of its
    document around the chunk that retrieved the template, under `cfg`'s instantiate model and format."""
    window_chars = int(cfg.instantiation.get("window_chars", 1200))
    starts, windows, reqs = [], [], []
    for row in matches.itertuples(index=False):
        start, window = instantiate.document_window(texts[row.document_id], row.chunk_char_center, window_chars)
        starts.append(start)
        windows.append(window)
        reqs.append(instantiation_request(cfg, templates[row.template_id], window))
    return starts, windows, reqs


def instantiation_request(cfg: Config, template: str, window: str) -> GenerationRequest:
    """One instantiation request under `cfg`'s instantiate model, prompt format and grammar switch."""
    spec = cfg.models["instantiate"]
    return instantiate.build_request(
        template,
        window,
        spec.model,
        spec.max_new_tokens,
        spec.temperature,
        constrain=_constrained(spec, cfg.instantiation.get("constrained_excerpts", True)),
        prompt_format=spec.prompt_format,
    )


def instruction_pairs(cfg: Config, shard_key: str, logger: Logger = log.info) -> StageResult:
    lake = Lake(cfg.lake_dir)
    matches = lake.read("template_matches", shard_key)
    docs = lake.read("documents", shard_key).set_index("document_id")
    templates = lake.read("template_index").set_index("template_id")
    starts, _, reqs = instantiation_requests(cfg, matches, docs["text"], templates["template"])
    ins = cfg.instantiation
    results, stats = _run_llm(cfg, "instantiate", reqs, logger)
    out, rej = instantiate.instantiate_results(
        matches.assign(template=[templates.at[t, "template"] for t in matches["template_id"]]),
        docs["text"].to_dict(),
        starts,
        results,
        float(ins.get("min_excerpt_ratio", 0.8)),
        int(ins.get("max_span_chars", 4000)),
        int(ins.get("min_answer_words", 0)),
    )
    return _finish(cfg, "instruction_pairs", shard_key, out, rej, len(matches), "matches", llm=stats)


def judged_corpus(cfg: Config, shard_key: str, logger: Logger = log.info) -> StageResult:
    pairs = Lake(cfg.lake_dir).read("instruction_pairs", shard_key)
    spec = cfg.models["judge"]
    reqs = [
        judge.build_request(
            i,
            a,
            spec.model,
            spec.max_new_tokens,
            _constrained(spec, cfg.judge.get("constrained_score", True)),
            spec.prompt_format,
        )
        for i, a in zip(pairs["instruction"], pairs["answer"], strict=True)
    ]
    results, stats = _run_llm(cfg, "judge", reqs, logger)
    out, rej = judge.judge_results(pairs, results, int(cfg.judge.get("min_score", 4)))
    scores = pd.concat([out["score"], rej["score"]]).dropna().astype(int).value_counts().sort_index()
    return _finish(
        cfg,
        "judged_corpus",
        shard_key,
        out,
        rej,
        len(pairs),
        "pairs",
        llm=stats,
        score_histogram={str(k): int(v) for k, v in scores.items()},
    )


def training_corpus(cfg: Config, shards: list[str], logger: Logger = log.info) -> StageResult:
    lake = Lake(cfg.lake_dir)
    judged = lake.read_all("judged_corpus", shards)
    if judged.empty:
        # The judge's own output shape, so an empty training corpus keeps its schema.
        judged, _ = judge.judge_results(pd.DataFrame(columns=instantiate.PAIR_COLUMNS), [], 4)

    doc_index = lake.read_all("document_index", shards)
    doc_tokens = dict(zip(doc_index.get("document_id", []), doc_index.get("n_tokens", []), strict=True))
    embedder_tok = Embedder(cfg.embedder).tokenizer
    tr = cfg.training

    def count(text: str) -> int:
        return len(embedder_tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    out, rej = budget.apply_budget(
        judged,
        doc_tokens,
        count,
        rollover=bool(tr.get("rollover", True)),
        budget_ratio=float(tr.get("budget_ratio", 1.0)),
    )
    export_dir = cfg.data_dir / "exports"
    export_dir.mkdir(parents=True, exist_ok=True)
    cols = ["pair_id", "document_id", "template_id", "corpus", "text", "tokens", "score"]
    exported = out[cols] if len(out) else pd.DataFrame(columns=cols)
    Lake(export_dir).write("training_corpus", "train", exported)
    tmp = export_dir / ".training_corpus.jsonl.tmp"
    exported.to_json(tmp, orient="records", lines=True, force_ascii=False)
    tmp.replace(export_dir / "training_corpus.jsonl")
    return _finish(
        cfg,
        "training_corpus",
        UNPARTITIONED,
        out.drop(columns=["accepted"], errors="ignore"),
        rej.drop(columns=["accepted"], errors="ignore"),
        len(judged),
        "pairs",
        tokens=int(out["tokens"].sum()) if len(out) else 0,
        exports=[str(export_dir / "training_corpus" / "train.parquet"), str(export_dir / "training_corpus.jsonl")],
    )


DISTILLATION_ASSETS = (
    "silver_genericizer_examples",
    "silver_instantiation_examples",
    "genericizer_model",
    "instantiator_model",
    "matching_embedding",
)

STAGES: dict[str, Callable[..., StageResult]] = {
    "raw_queries": raw_queries,
    "query_set": query_set,
    "template_bank": template_bank,
    "documents": documents,
    "document_index": document_index,
    "template_matches": template_matches,
    "instruction_pairs": instruction_pairs,
    "judged_corpus": judged_corpus,
}


def run_stage(
    cfg: Config, asset: str, partition: str, sources: list[str], shards: list[str], logger: Logger = log.info
) -> StageResult:
    """Run one (asset, partition) and stamp its accounting with the input signature it was built from."""
    from .plan import signature

    sig = signature(cfg, asset, partition, sources, shards)
    started = time.perf_counter()
    if asset == "template_index":
        result = template_index(cfg, sources, logger)
    elif asset == "training_corpus":
        result = training_corpus(cfg, shards, logger)
    elif asset in DISTILLATION_ASSETS:
        from . import distill_stages as ds

        if asset == "silver_genericizer_examples":
            result = ds.silver_genericizer_examples(cfg, sources, logger)
        elif asset == "silver_instantiation_examples":
            result = ds.silver_instantiation_examples(cfg, shards, logger)
        elif asset == "matching_embedding":
            result = ds.matching_embedding(cfg, shards, logger)
        else:
            result = getattr(ds, asset)(cfg, logger)
    else:
        result = STAGES[asset](cfg, partition, logger)
    result.accounting.extra["signature"] = sig
    result.accounting.extra["seconds"] = round(time.perf_counter() - started, 3)
    Lake(cfg.lake_dir).write_accounting(result.accounting)
    return result
