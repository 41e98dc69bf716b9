"""The `fineinstructions` command: run the whole graph without the UI, register partitions, read stats.

`run` materializes through Dagster (so every run shows in the UI of the same DAGSTER_HOME), but only
the partitions whose inputs changed: for each partition it finds the first stale stage of its chain
and materializes that stage and everything after it in one run.
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

from fineinstructions_core.config import ConfigError, load_config
from fineinstructions_core.io.catalog import lineage, refresh_catalog, stats
from fineinstructions_core.io.lake import UNPARTITIONED, Lake
from fineinstructions_core.llm.cache import RequestCache
from fineinstructions_core.plan import QUERY_CHAIN, SHARD_CHAIN, is_fresh, signature


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
    return DagsterInstance.get()


def cmd_run(args: argparse.Namespace) -> int:
    from dagster import AssetKey, materialize

    from .assets import ALL_ASSETS
    from .partitions import register_partitions
    from .resources import FineInstructionsResource

    overrides = _overrides(args.set)
    cfg = load_config(args.config, overrides)
    instance = _instance(cfg.root)
    added = register_partitions(cfg, instance)
    sources = list(instance.get_dynamic_partitions("query_sources"))
    shards = list(instance.get_dynamic_partitions("corpus_shards"))
    print(
        f"partitions: {len(sources)} query sources, {len(shards)} corpus shards "
        f"(new: {sum(len(v) for v in added.values())})",
        flush=True,
    )
    resource = FineInstructionsResource(
        config_path=str(Path(args.config).resolve()) if args.config else "",
        overrides=json.dumps(overrides) if overrides else "",
    )
    started = time.perf_counter()
    runs = 0

    def stale_suffix(chain: list[str], partition: str) -> list[str]:
        for i, asset in enumerate(chain):
            if args.all or not is_fresh(cfg, asset, partition, signature(cfg, asset, partition, sources, shards)):
                return chain[i:]
        return []

    def launch(selection: list[str], partition: str | None) -> None:
        nonlocal runs
        label = f"{', '.join(selection)}" + (f" [{partition}]" if partition else "")
        print(f"materializing {label}", flush=True)
        t = time.perf_counter()
        result = materialize(
            ALL_ASSETS,
            selection=[AssetKey(a) for a in selection],
            partition_key=partition,
            instance=instance,
            resources={"fi": resource},
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": args.log_level}}}},
        )
        runs += 1
        if not result.success:
            raise SystemExit(
                f"run {result.run_id} failed for {label}; see the Dagster UI or "
                f"`dagster run logs` under {os.environ['DAGSTER_HOME']}"
            )
        print(f"  done in {time.perf_counter() - t:.1f}s (run {result.run_id[:8]})", flush=True)

    for src in sources:
        todo = stale_suffix(QUERY_CHAIN, src)
        if todo:
            launch(todo, src)
    for asset in ("template_index",):
        if stale_suffix([asset], UNPARTITIONED):
            launch([asset], None)
    for shard in shards:
        todo = stale_suffix(SHARD_CHAIN, shard)
        if todo:
            launch(todo, shard)
    if stale_suffix(["training_corpus"], UNPARTITIONED):
        launch(["training_corpus"], None)
    elapsed = time.perf_counter() - started
    refresh_catalog(cfg.catalog_path, cfg.lake_dir)
    summary = stats(Lake(cfg.lake_dir).all_accounting())
    print(f"pipeline finished: {runs} runs in {elapsed:.1f}s; catalog at {cfg.catalog_path}")
    for name, s in summary.items():
        rej = ", ".join(f"{k}={v}" for k, v in s["rejected_by_reason"].items()) or "-"
        print(f"  {name:18s} in={s['rows_in']:<5d} out={s['rows_out']:<5d} rejected={s['rows_rejected']:<5d} [{rej}]")
    if args.timing_file:
        Path(args.timing_file).write_text(json.dumps({"pipeline_seconds": round(elapsed, 2), "runs": runs}))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from .partitions import register_partitions

    cfg = load_config(args.config, _overrides(args.set))
    added = register_partitions(cfg, _instance(cfg.root))
    print(json.dumps(added, indent=1))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args.set))
    summary = stats(Lake(cfg.lake_dir).all_accounting())
    if args.json:
        print(json.dumps({"stages": summary, "all_balanced": all(s["balanced"] for s in summary.values())}, indent=1))
    else:
        for name, s in summary.items():
            print(f"{name:18s} {s['unit']:9s} in={s['rows_in']} out={s['rows_out']} rejected={s['rejected_by_reason']}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args.set))
    refresh_catalog(cfg.catalog_path, cfg.lake_dir)
    row = lineage(cfg.catalog_path, args.pair_id)
    if row is None:
        print(f"no pair {args.pair_id!r} in {cfg.catalog_path}", file=sys.stderr)
        return 1
    print(json.dumps(row, indent=1, ensure_ascii=False))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args.set))
    print(json.dumps(RequestCache(cfg.request_cache_path).size(), indent=1))
    return 0


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
    p.add_argument("--log-level", default="INFO", help="Dagster console log level (default INFO: progress)")
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
    sub.add_parser("cache", help="size of the LLM request cache").set_defaults(func=cmd_cache)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
