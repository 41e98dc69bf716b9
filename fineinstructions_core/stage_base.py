"""What every stage shares: the context it runs in, its result, its accounting, and the cached LLM call.

A stage function takes a `StageContext` and returns `ctx.finish(...)`: the context knows the stage's
name, accounting unit and partition (from its spec in the registry), writes the output, the rejections
(every rejected row with its reason) and the accounting record (rows in = rows out + rows rejected).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .config import Config, ModelSpec
from .io.lake import Accounting, Lake, rejection_counts
from .llm.backends import make_backend
from .llm.base import GenerationRequest, GenerationResult, LLMStats
from .llm.cache import CachedLLM, RequestCache

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


@dataclass
class StageContext:
    """One (stage, partition) being computed: the config, the active partitions it may read, a logger."""

    cfg: Config
    name: str
    unit: str
    partition: str
    sources: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    logger: Logger = log.info
    ancestors: list[str] = field(default_factory=list)  # every stage upstream of this one, in run order

    @property
    def lake(self) -> Lake:
        return Lake(self.cfg.lake_dir)

    def finish(
        self,
        out: pd.DataFrame,
        rej: pd.DataFrame,
        rows_in: int,
        llm: LLMStats | None = None,
        rows_out: int | None = None,
        **extra: Any,
    ) -> StageResult:
        """Write the output, its rejections and the accounting record; the result the layers report."""
        lake = self.lake
        lake.write(self.name, self.partition, out)
        lake.write_rejections(self.name, self.partition, rej)
        acc = Accounting(
            asset=self.name,
            partition=self.partition,
            unit=self.unit,
            rows_in=int(rows_in),
            rows_out=int(len(out) if rows_out is None else rows_out),
            rejected=rejection_counts(rej),
            extra={"llm": llm.as_dict() if llm else None, **extra},
        )
        lake.write_accounting(acc)
        return StageResult(self.name, self.partition, out, rej, acc, llm.as_dict() if llm else None, extra)

    def run_llm(
        self, stage: str, requests: list[GenerationRequest], cfg: Config | None = None
    ) -> tuple[list[GenerationResult], LLMStats]:
        """Generate through the request cache with `stage`'s model of `cfg` (default: the context's)."""
        llm = llm_for(cfg or self.cfg, stage)
        describe = getattr(llm.backend, "describe", None)
        if describe is not None:
            self.logger(f"{stage}: {len(requests)} requests on {describe()}")
        results = llm.generate(requests, progress=ProgressReporter(stage, self.logger))
        return results, llm.stats


def constrained(spec: ModelSpec, section_default: bool) -> bool:
    """A profile's stage may switch its grammar off (a server backend cannot apply it) over the section."""
    return bool(section_default) if spec.constrained is None else spec.constrained


def llm_for(cfg: Config, stage: str) -> CachedLLM:
    spec = cfg.models[stage]
    backend = make_backend(spec, cfg.cache_dir)
    # Big chunks: a backend keeps its batch full across a chunk and drains only at its end, and answers
    # reach the cache as each finishes, so a big chunk loses nothing when a run dies.
    return CachedLLM(backend, RequestCache(cfg.request_cache_path), chunk_size=max(spec.batch_size * 32, 64))


class ProgressReporter:
    """done/total, the rate (tokens/s when the caller counts tokens, else items/s) and ETA, at most every
    `every` seconds (and at the end)."""

    def __init__(self, label: str, logger: Logger, every: float = 15.0, unit: str = "requests"):
        self.label, self.logger, self.every, self.unit = label, logger, every, unit
        self.start = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, tokens: int | None = None) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        eta = (elapsed / done * (total - done)) if done else float("nan")
        head = f"{self.label}: {done}/{total} {self.unit}"
        if tokens is None:
            rate = done / elapsed if elapsed > 0 else 0.0
            self.logger(f"{head}, {rate:.2f}/s, ETA {eta:.0f}s")
        else:
            rate = tokens / elapsed if elapsed > 0 else 0.0
            self.logger(f"{head}, {tokens} new tokens, {rate:.1f} tok/s, ETA {eta:.0f}s")
