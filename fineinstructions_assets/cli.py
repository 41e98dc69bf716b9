"""The `fineinstructions` command: run the whole graph without the UI, register partitions, read stats.

`run` materializes through Dagster, each run a run of one of the code location's jobs (so it shows in the
UI of the same DAGSTER_HOME under that job, and the UI can re-execute it), but only
the partitions whose inputs changed. The run order comes from the stage registry: for each chain of
partitioned stages and each partition it finds the first stale stage and materializes that stage and
everything after it in one run; each unpartitioned stage runs on its own when it is stale.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fineinstructions_core.config import Config, ConfigError, default_config_path, load_config
from fineinstructions_core.io.catalog import lineage, refresh_catalog, stats
from fineinstructions_core.io.lake import UNPARTITIONED, Lake
from fineinstructions_core.llm.cache import RequestCache
from fineinstructions_core.plan import runs_to_do
from fineinstructions_core.registry import REGISTRY


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set matching.threshold=0.3` -> {"matching": {"threshold": 0.3}} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _instance(cfg_root: Path):
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        home = cfg_root / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(home)
    # Two processes opening a fresh instance at once would both create its SQLite schemas and stamp
    # them twice ("more than one head"); the first creates them under this lock, the rest find them.
    import fcntl

    with open(Path(os.environ["DAGSTER_HOME"]) / ".fineinstructions-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        instance = DagsterInstance.get()
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("query_sources")
        instance.event_log_storage.get_concurrency_keys()
        instance.all_instigator_state()
    return instance


def _active_accounting(cfg) -> list[dict[str, Any]]:
    """Accounting of the partitions the config implies (removed sources and corpora are left out)."""
    from fineinstructions_core.shards import manifest_shard_keys

    keys = set(cfg.source_partitions) | {UNPARTITIONED}
    keys |= manifest_shard_keys(cfg)
    return [rec for rec in Lake(cfg.lake_dir).all_accounting() if rec["partition"] in keys]


def _failure_reason(result: Any) -> str:
    """The error a failed run's first failed step raised: the stage's own message, not Dagster's wrapper
    around it (nor the low-level error the stage's message explains)."""
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
            error = error.cause
        if error is not None:
            lines = error.message.strip().splitlines()
            return lines[0] if lines else str(error.cls_name)
    return "no step failed (see the run's log)"


def _blocked(
    failed: dict[str, set[str]], selection: list[str], partition: str, sources: list[str], shards: list[str]
) -> list[str]:
    """The stages of a planned run that read a partition that failed (or was skipped) earlier in this
    pass; they are left out, and recorded as failed for what reads them in turn."""
    from fineinstructions_core.plan import input_partitions

    blocked = []
    for name in selection:
        spec = REGISTRY[name]
        for up in spec.upstream + spec.reads:
            reads = input_partitions(spec, REGISTRY[up], partition, sources, shards)
            if up in blocked or set(reads) & failed.get(up, set()):
                blocked.append(name)
                break
    for name in blocked:
        failed.setdefault(name, set()).add(partition)
    return blocked


def cmd_run(args: argparse.Namespace) -> int:
    if os.environ.get("FI_EXECUTOR"):  # before the code location loads with that executor
        print(
            f"error: FI_EXECUTOR={os.environ['FI_EXECUTOR']} is set: `fineinstructions run` executes runs in this "
            "process; launch them from the UI or with `dagster job launch` on that deployment",
            file=sys.stderr,
        )
        return 2
    from fineinstructions_core.preflight import preflight

    from .definitions import job_for
    from .partitions import active_partitions, register_partitions
    from .runs import PoolTimeout, cli_run_config, execute_defined_job, process_tags, reap_dead_runs, wait_for_pools

    overrides = _overrides(args.set)
    cfg = load_config(args.config, overrides)
    problems = preflight(cfg, include_distillation=args.distillation)
    if problems:
        print("error: the run cannot start:\n  " + "\n  ".join(map(str, problems)), file=sys.stderr)
        return 2
    instance = _instance(cfg.root)
    reaped = reap_dead_runs(instance)
    if reaped:
        print(
            f"marked {len(reaped)} run(s) failed whose process is gone ({', '.join(r[:8] for r in reaped)}) "
            "and freed their concurrency slots",
            flush=True,
        )
    _stop_cleanly_on_signals(instance)
    added = register_partitions(cfg, instance)
    sources, shards = active_partitions(cfg, instance)
    print(
        f"partitions: {len(sources)} query sources, {len(shards)} corpus shards "
        f"(new: {sum(len(v) for v in added.values())})",
        flush=True,
    )
    # The config file resolved (FI_CONFIG or ./fineinstructions.yaml when --config is not given), so a
    # re-execution from the UI reads the same one.
    config_file = Path(args.config) if args.config else default_config_path()
    run_config = cli_run_config(config_file.resolve(), json.dumps(overrides) if overrides else "", args.log_level)
    started = time.perf_counter()
    runs = 0
    failed: dict[str, set[str]] = {}
    failures: list[str] = []

    def launch(selection: list[str], partition: str | None) -> None:
        nonlocal runs
        key = partition or UNPARTITIONED
        blocked = _blocked(failed, selection, key, sources, shards)
        where = f" [{partition}]" if partition else ""
        if blocked:
            failures.append(f"skipped {', '.join(blocked)}{where}: an input failed")
            print(f"skipping {', '.join(blocked)}{where}: an input failed", flush=True)
            selection = [s for s in selection if s not in blocked]
            if not selection:
                return
        label = f"{', '.join(selection)}{where}"
        print(f"materializing {label}", flush=True)
        t = time.perf_counter()
        pools = sorted({REGISTRY[s].pool for s in selection if REGISTRY[s].pool})
        try:
            wait_for_pools(instance, pools, args.pool_timeout, lambda m: print(m, flush=True))
        except PoolTimeout as exc:
            failures.append(f"{label}: {exc}")
            print(f"  not started: {exc}", flush=True)
            for s in selection:
                failed.setdefault(s, set()).add(key)
            return
        job_name = job_for(selection)
        result = execute_defined_job(instance, job_name, selection, partition, run_config, process_tags())
        runs += 1
        if not result.success:
            done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
            lost = [s for s in selection if s not in done]
            for s in lost:
                failed.setdefault(s, set()).add(key)
            failures.append(
                f"run {result.run_id[:8]} failed for {label} (not materialized: {', '.join(lost)}): "
                f"{_failure_reason(result)}"
            )
            print(
                f"  FAILED in {time.perf_counter() - t:.1f}s (run {result.run_id}); see the Dagster UI or "
                f"`dagster run logs` under {os.environ['DAGSTER_HOME']}; continuing with what does not depend on it",
                flush=True,
            )
            return
        print(f"  done in {time.perf_counter() - t:.1f}s (run {result.run_id[:8]} of {job_name})", flush=True)

    for stages, partition in runs_to_do(cfg, sources, shards, include_on_demand=args.distillation, force=args.all):
        launch(stages, partition)
    elapsed = time.perf_counter() - started
    refresh_catalog(cfg.catalog_path, cfg.lake_dir, REGISTRY.names())
    summary = stats(_active_accounting(cfg), REGISTRY.names())
    outcome = "finished" if not failures else f"finished with {len(failures)} failure(s)"
    print(f"pipeline {outcome}: {runs} runs in {elapsed:.1f}s; catalog at {cfg.catalog_path}")
    for name, s in summary.items():
        rej = ", ".join(f"{k}={v}" for k, v in s["rejected_by_reason"].items()) or "-"
        print(f"  {name:18s} in={s['rows_in']:<5d} out={s['rows_out']:<5d} rejected={s['rows_rejected']:<5d} [{rej}]")
    if args.timing_file:
        Path(args.timing_file).write_text(json.dumps({"pipeline_seconds": round(elapsed, 2), "runs": runs}))
    if failures:
        print("failures:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _stop_cleanly_on_signals(instance) -> None:
    """SIGTERM or SIGINT: mark this process's unfinished runs failed and free their slots, then exit."""
    import signal

    from .runs import reap_dead_runs

    def stop(signum: int, frame: object) -> None:
        reaped = reap_dead_runs(instance, only_pid=os.getpid())
        print(
            f"stopped by signal {signum}: marked {len(reaped)} run(s) failed and freed their concurrency slots",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def cmd_register(args: argparse.Namespace) -> int:
    from .partitions import register_partitions

    cfg = load_config(args.config, _overrides(args.set))
    added = register_partitions(cfg, _instance(cfg.root))
    print(json.dumps(added, indent=1))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args.set))
    summary = stats(_active_accounting(cfg), REGISTRY.names())
    if args.json:
        print(json.dumps({"stages": summary, "all_balanced": all(s["balanced"] for s in summary.values())}, indent=1))
    else:
        for name, s in summary.items():
            print(f"{name:18s} {s['unit']:9s} in={s['rows_in']} out={s['rows_out']} rejected={s['rejected_by_reason']}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args.set))
    refresh_catalog(cfg.catalog_path, cfg.lake_dir, REGISTRY.names())
    row = lineage(cfg.catalog_path, args.pair_id)
    if row is None:
        print(f"no pair {args.pair_id!r} in {cfg.catalog_path}", file=sys.stderr)
        return 1
    print(json.dumps(row, indent=1, ensure_ascii=False))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args.set))
    cache = RequestCache(cfg.request_cache_path)
    report: dict[str, Any] = {"path": str(cfg.request_cache_path)}
    if args.prune_older_than is not None or args.prune_model is not None:
        report["pruned"] = cache.prune(args.prune_older_than, args.prune_model)
    print(json.dumps(report | cache.size() | {"by_model": cache.models()}, indent=1))
    return 0


def _labelled(args: argparse.Namespace):
    from fineinstructions_core.evaluation import load_labelled_set, subset_by_titles

    data = load_labelled_set(
        Path(args.questions),
        Path(args.paragraphs),
        args.question_field,
        args.link_field,
        args.paragraph_id_field,
        args.paragraph_text_field,
        args.impossible_field,
        args.limit,
        spread=args.spread,
        max_questions=args.max_questions,
    )
    if args.heldout_articles:
        from fineinstructions_core.distill import HELDOUT_ARTICLES

        data = subset_by_titles(data, HELDOUT_ARTICLES)
    return data


def _descriptions(cfg, data, mode: str) -> tuple[list[str], list[bool]]:
    """raw: the question is its own description; genericized: the configured genericizer's description."""
    if mode == "raw":
        return list(data.questions), [True] * len(data.questions)
    from fineinstructions_core import genericize
    from fineinstructions_core.llm_requests import genericize_requests
    from fineinstructions_core.stage_base import ProgressReporter, llm_for
    from fineinstructions_core.templates import check_template

    llm = llm_for(cfg, "genericize")
    reqs = genericize_requests(cfg, data.questions)
    results = llm.generate(reqs, progress=ProgressReporter("genericize", lambda m: print(m, file=sys.stderr)))
    out, keep = [], []
    for q, r in zip(data.questions, results, strict=True):
        parsed = None if r.error else genericize.parse_output(r.text)
        ok = bool(parsed) and check_template(parsed[0], parsed[1], q).ok
        out.append(parsed[1] if parsed else "")
        keep.append(ok)
    return out, keep


def _profile_threshold(cfg: Config) -> float | None:
    """The active profile's matching threshold; None when it is `calibrated` and not calibrated yet."""
    try:
        return cfg.matching_threshold()
    except ConfigError:
        return None


def cmd_eval_matching(args: argparse.Namespace) -> int:
    from fineinstructions_core.embed import Embedder
    from fineinstructions_core.evaluation import concatenated_articles, evaluate, long_document_coverage

    cfg = load_config(args.config, _overrides(args.set))
    data = _labelled(args)
    m = cfg.matching
    K, sigma, alpha = m.k, m.sigma, m.alpha
    embedder = Embedder(cfg.embedder)
    pooled = embedder.embed_documents(data.texts, K, sigma, alpha, min_width=m.min_local_width)
    threshold = _profile_threshold(cfg)
    report: dict[str, Any] = {
        "paragraphs": len(data.pids),
        "questions": len(data.questions),
        "threshold": m.threshold if threshold is None else threshold,
        "k": K,
        "sigma": sigma,
        "min_local_width": m.min_local_width,
        "alpha": alpha,
    }
    modes = ["raw", "genericized"] if args.mode == "both" else [args.mode]
    unanswerable = {}
    for mode in modes:
        desc, keep = _descriptions(cfg, data, mode)
        res = evaluate(data, desc, keep, embedder, pooled, report["threshold"])
        report[mode] = res["metrics"]
        unanswerable[mode] = res["unanswerable"]
    report["unanswerable"] = unanswerable if len(modes) > 1 else unanswerable[modes[0]]
    if args.long_documents:
        # Recall on whole articles (raw questions), and where each local vector's best question points.
        articles = concatenated_articles(data)
        long_pooled = embedder.embed_documents(articles.texts, K, sigma, alpha, min_width=m.min_local_width)
        long_recall = evaluate(
            articles,
            list(articles.questions),
            [True] * len(articles.questions),
            embedder,
            long_pooled,
            report["threshold"],
        )["metrics"]
        report["long_documents"] = {"articles": len(articles.pids), "raw": long_recall} | long_document_coverage(
            data, embedder, K, sigma, alpha, min_width=m.min_local_width
        )
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fineinstructions_core.embed import Embedder
    from fineinstructions_core.evaluation import calibrate_threshold

    cfg = load_config(args.config, _overrides(args.set))
    data = _labelled(args)
    m = cfg.matching
    embedder = Embedder(cfg.embedder)
    pooled = embedder.embed_documents(data.texts, m.k, m.sigma, m.alpha, min_width=m.min_local_width)
    desc, keep = _descriptions(cfg, data, args.mode)
    result = calibrate_threshold(data, desc, keep, embedder, pooled)
    result |= {"mode": args.mode, "embedder": embedder.identity, "current_threshold": _profile_threshold(cfg)}
    print(json.dumps(result, indent=1))
    return 0


def cmd_eval_students(args: argparse.Namespace) -> int:
    from fineinstructions_core.student_eval import compare_students

    overrides = _overrides(args.set)
    baseline = load_config(args.config, overrides | {"model_profile": args.baseline})
    student = load_config(args.config, overrides | {"model_profile": args.student})
    report = compare_students(
        baseline, student, args.queries_per_source, args.paragraphs, lambda m: print(m, file=sys.stderr)
    )
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


def cmd_eval_judge(args: argparse.Namespace) -> int:
    from fineinstructions_core.judge_eval import evaluate_profile, outcome_record, report_table

    overrides = _overrides(args.set)
    reports = {}
    for profile in args.profile or [None]:
        cfg = load_config(args.config, overrides | ({"model_profile": profile} if profile else {}))
        path = cfg.path(args.labelled or cfg.judge.labelled_set or "")
        if not (args.labelled or cfg.judge.labelled_set):
            raise ConfigError("no labelled set: pass --labelled PATH or set judge.labelled_set")
        pairs, judgements, rep = evaluate_profile(cfg, path, args.split, lambda m: print(m, file=sys.stderr))
        reports[cfg.profile_name] = rep
        if args.rows:
            with open(args.rows, "a", encoding="utf-8") as f:
                for p, j in zip(pairs, judgements, strict=True):
                    f.write(json.dumps({"profile": cfg.profile_name} | outcome_record(p, j)) + "\n")
        if not args.json:
            s = rep["settings"]
            print(
                f"## profile {s['profile']}: {s['rows']} {s['split']} pairs; judge {s['judge']}, min_score "
                f"{s['min_score']}; relevance threshold {s['relevance_threshold']} (calibrated on dev)\n"
            )
            print(report_table(rep["configurations"]) + "\n")
    if args.json:
        print(json.dumps(reports))
    return 0


def _labelled_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", required=True, help="JSONL of questions, each linked to a paragraph")
    p.add_argument("--paragraphs", required=True, help="JSONL of paragraphs")
    p.add_argument("--question-field", default="question")
    p.add_argument("--link-field", default="pid", help="question field holding its paragraph's id")
    p.add_argument("--paragraph-id-field", default="pid")
    p.add_argument("--paragraph-text-field", default="text")
    p.add_argument("--impossible-field", default="is_impossible", help="true for unanswerable questions")
    p.add_argument("--limit", type=int, default=None, help="use only the first N paragraphs")
    p.add_argument("--spread", type=int, default=None, help="use N paragraphs evenly spaced over the file")
    p.add_argument("--max-questions", type=int, default=None, help="a seeded sample of at most N questions")
    p.add_argument(
        "--heldout-articles",
        action="store_true",
        help="only the SQuAD articles the matching embedding is never trained on",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineinstructions", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="project config (default: FI_CONFIG or ./fineinstructions.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="materialize every stale partition of the whole graph, no UI")
    p.add_argument(
        "--all", action="store_true", help="rematerialize everything (LLM answers still come from the cache)"
    )
    p.add_argument("--timing-file", default=None, help="write the pipeline time as JSON to this file")
    p.add_argument(
        "--distillation",
        action="store_true",
        help="then the distillation loop: silver examples, student models, the fine-tuned matching embedder",
    )
    p.add_argument("--log-level", default="INFO", help="Dagster console log level (default INFO: progress)")
    p.add_argument(
        "--pool-timeout",
        type=float,
        default=float(os.environ.get("FI_POOL_TIMEOUT", 3600)),
        metavar="SECONDS",
        help="give up on a run whose concurrency pool stays held by another live run this long (default 3600)",
    )
    p.set_defaults(func=cmd_run)
    sub.add_parser("register", help="register query sources and corpus shards as Dagster partitions").set_defaults(
        func=cmd_register
    )
    p = sub.add_parser("stats", help="per stage: rows in, out, rejected by reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("lineage", help="query, template, document and scores behind one pair")
    p.add_argument("pair_id")
    p.set_defaults(func=cmd_lineage)
    p = sub.add_parser("cache", help="size of the LLM request cache, per model; prune it")
    p.add_argument("--prune-older-than", type=float, default=None, metavar="DAYS")
    p.add_argument("--prune-model", default=None, metavar="IDENTITY", help="drop every answer of one model")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("eval-matching", help="recall@k and MRR of template matching on labelled questions")
    _labelled_args(p)
    p.add_argument("--mode", choices=["raw", "genericized", "both"], default="raw")
    p.add_argument("--long-documents", action="store_true", help="also measure local-vector coverage of articles")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.set_defaults(func=cmd_eval_matching)
    p = sub.add_parser(
        "eval-students", help="held-out pass rates of two profiles' genericizer and instantiator (raw vs distilled)"
    )
    p.add_argument("--baseline", default="embedded", help="profile to compare against (default: embedded)")
    p.add_argument("--student", default="distilled", help="profile with the students (default: distilled)")
    p.add_argument("--queries-per-source", type=int, default=20)
    p.add_argument("--paragraphs", type=int, default=30, help="held-out SQuAD paragraphs to instantiate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_students)
    p = sub.add_parser(
        "eval-judge", help="precision, recall and ROC-AUC of the judge, the gates and both on the labelled judge set"
    )
    p.add_argument("--labelled", default=None, help="labelled pairs (default: judge.labelled_set)")
    p.add_argument("--split", choices=["dev", "heldout"], default="heldout", help="rows to measure (default heldout)")
    p.add_argument("--profile", action="append", default=[], help="a model profile to measure (repeatable)")
    p.add_argument("--rows", default=None, metavar="FILE", help="append each pair's gates and score as JSONL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_judge)
    p = sub.add_parser("calibrate-threshold", help="propose a similarity threshold from labelled pairs")
    _labelled_args(p)
    p.add_argument("--mode", choices=["raw", "genericized"], default="genericized")
    p.set_defaults(func=cmd_calibrate)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:  # LabelledSetError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
