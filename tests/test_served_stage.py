"""The instantiation stage materialized through a real OpenAI-compatible server (`transformers serve`
with the embedded SmolLM2), compared with the in-process backend; then the server killed mid-stage."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_tiny_project
from dagster import DagsterInstance, materialize

from fineinstructions_assets.assets import instruction_pairs
from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.resources import FineInstructionsResource
from fineinstructions_core import genericize
from fineinstructions_core.config import load_config
from fineinstructions_core.io.lake import UNPARTITIONED, Lake
from fineinstructions_core.llm.base import GenerationResult
from fineinstructions_core.llm.cache import RequestCache
from fineinstructions_core.llm.local_server import serving_missing, start_server, stop_server
from fineinstructions_core.llm.models import EMBEDDED_LLM, resolve_llm
from fineinstructions_core.plan import run_stage
from fineinstructions_core.shards import manifest_shard_keys

pytestmark = pytest.mark.e2e

CACHE = Path(os.environ["FI_MODEL_CACHE"])

# The template bank is seeded through the real parser and validator, so the test does not depend on
# what the 135M genericizer happens to write.
BANK = [
    ("how do I <fi>task</fi> on <fi>operating system</fi>?", "A system guide that explains how to do a task."),
    ("what is <fi>a software project</fi>?", "A text that introduces a software project and what it is."),
    ("who started <fi>a project or organization</fi>?", "A history of a project that names its founders."),
]
COMPARED = ["match_id", "instruction", "answer", "excerpt_spans", "excerpt_ratio", "status", "raw_output"]


def _outputs(lake: Lake, shard: str) -> pd.DataFrame:
    """Every match's row, kept or rejected, in one frame."""
    kept = lake.read("instruction_pairs", shard).assign(reason="")
    rej = lake.read_rejections("instruction_pairs", shard)
    both = pd.concat([kept, rej], ignore_index=True)
    for col in COMPARED:
        if col not in both:
            both[col] = None
    both["excerpt_spans"] = both["excerpt_spans"].map(
        lambda v: json.dumps([[int(x) for x in span] for span in v]) if hasattr(v, "__len__") else "null"
    )
    return both[COMPARED + ["reason"]].sort_values("match_id").reset_index(drop=True).astype(str)


def _materialize(project: Path, overrides: dict, shard: str, instance: DagsterInstance):
    fi = FineInstructionsResource(config_path=str(project), overrides=json.dumps(overrides))
    return materialize(
        [instruction_pairs], partition_key=shard, instance=instance, resources={"fi": fi}, raise_on_error=False
    )


def test_instantiation_through_transformers_serve(tmp_path: Path, dagster_home: Path) -> None:
    reason = serving_missing()
    if reason:
        pytest.skip(reason)
    project = make_tiny_project(tmp_path, queries=2, docs=2)
    common = {
        "instantiation": {"constrained_excerpts": False},  # a generic server cannot apply the grammar
        "matching": {"max_templates": 3, "threshold": 0.0},
    }
    local = {"model_profiles": {"embedded": {"instantiate": {"max_new_tokens": 40, "batch_size": 1}}}} | common
    cfg = load_config(project, local)
    instance = DagsterInstance.get()
    register_partitions(cfg, instance)
    shard = sorted(k for k in manifest_shard_keys(cfg) if k.startswith("debian"))[0]

    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(3)], "source": "nq", "query": ["seed"] * 3})
    seeded = [GenerationResult(f"Template: {t}\nDocument: {d}") for t, d in BANK]
    bank, rejected = genericize.genericize_results(queries, seeded)
    assert len(bank) == 3 and rejected.empty
    lake = Lake(cfg.lake_dir)
    lake.write("template_bank", "nq", bank)
    run_stage(cfg, "template_index", UNPARTITIONED, ["nq"], [shard])
    for asset in ("documents", "document_index", "template_matches"):
        run_stage(cfg, asset, shard, ["nq"], [shard])
    n = len(lake.read("template_matches", shard))
    assert n >= 4, "the shard's two documents get up to three templates each"

    # 1. In process: the reference output.
    assert _materialize(project, local, shard, instance).success
    reference = _outputs(lake, shard)
    assert len(reference) == n

    # 2. Through the server, which is killed once an answer is in the cache.
    model_dir = resolve_llm(EMBEDDED_LLM, CACHE)[0]
    url, proc = start_server(model_dir, tmp_path / "serve1.log")
    identity = f"openai:{resolve_llm(EMBEDDED_LLM, CACHE)[1]}"

    def served(base_url: str) -> dict:
        spec = {
            "backend": "openai",
            "model": str(model_dir),
            "base_url": base_url,
            "tokenizer_path": EMBEDDED_LLM,  # render the exact prompt locally, as in process
            "identity_model": resolve_llm(EMBEDDED_LLM, CACHE)[1],
            "concurrency": 1,
            "max_retries": 1,
            "backoff_s": 0.1,
            "max_new_tokens": 40,
        }
        return {"model_profiles": {"embedded": {"instantiate": spec}}} | common

    cache = RequestCache(cfg.request_cache_path)

    def kill_after_first_answer() -> None:
        deadline = time.monotonic() + 300
        while cache.models().get(identity, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_server(proc, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_answer)
    killer.start()
    try:
        failed = _materialize(project, served(url), shard, instance)
    finally:
        killer.join()
        stop_server(proc)
    assert not failed.success
    [failure] = failed.get_step_failure_events()
    message = str(failure.event_specific_data.error)
    assert f"cannot reach the OpenAI-compatible server at {url}" in message, message
    kept = cache.models().get(identity, 0)
    assert 1 <= kept < n, (kept, n)  # finished requests are cached, the rest never ran

    # 3. A new server (another port; the cache key does not depend on it): only the missing requests run.
    url2, proc2 = start_server(model_dir, tmp_path / "serve2.log")
    try:
        rerun = _materialize(project, served(url2), shard, instance)
    finally:
        stop_server(proc2)
    assert rerun.success
    meta = rerun.asset_materializations_for_node("instruction_pairs")[0].metadata
    assert (meta["llm_cache_hits"].value, meta["llm_cache_misses"].value) == (kept, n - kept)
    assert meta["llm_errors"].value == 0
    # Greedy decoding of the same rendered prompts: the served stage writes exactly what in-process wrote.
    pd.testing.assert_frame_equal(_outputs(lake, shard), reference)
