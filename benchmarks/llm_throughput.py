"""The in-process LLM paths side by side, per stage: transformers' `generate` (length-sorted batches, the
path before continuous batching) against the continuous path (shared prefix computed once, rows that
refill as they end), on the same real requests of the genericize, instantiate and judge stages, greedy,
with the stages' own grammars, request cache bypassed, in one process one right after the other.

Prints per stage: prompt and output tokens, wall, prompt tokens/s, output tokens/s, speedup, and whether
the texts are the same; then how far the continuous path is from this machine's limits: the prompt tokens
it computed per request against the request's own (unshared) tokens, and its output tokens/s against
the memory-bandwidth bound of a decode step (weights plus key/value cache read once per step, at the
bandwidth measured here) and the compute bound (the model's FLOPs per token at the matmul rate measured
here). `--server` adds a local OpenAI-compatible server (`transformers serve`) through the openai backend.

    python benchmarks/llm_throughput.py [--genericize 40] [--instantiate 12] [--judge 12] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fineinstructions_core import instantiate, llm_requests
from fineinstructions_core.config import load_config
from fineinstructions_core.llm.base import GenerationRequest, GenerationResult
from fineinstructions_core.llm.models import EMBEDDED_LLM, resolve_llm
from fineinstructions_core.llm.transformers_backend import TransformersBackend, available_cores

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
TEMPLATES = [
    "how do I <fi>task</fi> on <fi>operating system</fi>?",
    "what is <fi>a software project</fi>?",
    "Why would I use <fi>a tool</fi> instead of <fi>another tool</fi>?",
    "<fi>type of error</fi> in <fi>kind of program</fi>",
]


def stage_requests(n_generic: int, n_inst: int, n_judge: int) -> dict[str, list[GenerationRequest]]:
    """Real requests, built by the stages' own builders under the project config."""
    cfg = load_config(ROOT / "fineinstructions.yaml")
    queries = [json.loads(x)["question"] for x in open(SAMPLE / "queries" / "NQ-open.efficientqa.dev.1.1.jsonl")]
    docs = [json.loads(x)["text"] for x in open(SAMPLE / "documents" / "debian-handbook.jsonl", encoding="utf-8")]
    windows = [instantiate.document_window(docs[i % len(docs)], 0, 1200)[1] for i in range(max(n_inst, n_judge))]
    return {
        "genericize": llm_requests.genericize_requests(cfg, queries[:n_generic]),
        "instantiate": [
            llm_requests.instantiation_request(cfg, TEMPLATES[i % len(TEMPLATES)], windows[i]) for i in range(n_inst)
        ],
        "judge": [llm_requests.judge_request(cfg, queries[i], windows[i][:500]) for i in range(n_judge)],
    }


def measure(backend: Any, reqs: list[GenerationRequest]) -> tuple[dict[str, float], list[GenerationResult]]:
    start = time.perf_counter()
    results = backend.generate(reqs)
    wall = time.perf_counter() - start
    prompt = sum(r.prompt_tokens for r in results)
    out = sum(r.completion_tokens for r in results)
    return {
        "seconds": round(wall, 2),
        "prompt_tokens": prompt,
        "output_tokens": out,
        "prompt_tokens_per_s": round(prompt / wall, 1),
        "output_tokens_per_s": round(out / wall, 2),
        "errors": sum(1 for r in results if r.error),
    }, results


def machine_rates() -> dict[str, float]:
    """Memory bandwidth (GB/s, a large tensor read) and fp32 matmul rate (GFLOP/s, decode-step shapes)."""
    import torch

    a = torch.randn(64 * 1024 * 1024)
    a.sum()
    start = time.perf_counter()
    for _ in range(5):
        a.sum()
    bandwidth = 5 * a.numel() * 4 / (time.perf_counter() - start) / 1e9
    x, w = torch.randn(32, 576), torch.randn(1536, 576)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(200):
        torch.nn.functional.linear(x, w)
    gflops = 200 * 2 * 32 * 576 * 1536 / (time.perf_counter() - start) / 1e9
    return {"bandwidth_gb_s": round(bandwidth, 1), "matmul_gflop_s": round(gflops, 1)}


def limits(backend: TransformersBackend, rates: dict[str, float]) -> dict:
    """How far the continuous path is from the limits, from its own decode statistics."""
    stats = backend.last_stats
    model = backend._ensure()[1]
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert stats is not None
    rows_per_step = stats.output_tokens / max(stats.decode_steps + 1, 1)
    # a decode step reads every weight once and each row's cache (shared prefix once): bytes per step
    own = (stats.prompt_tokens - stats.requests * stats.shared_prefix_tokens) / max(stats.requests, 1)
    cache_bytes = (stats.shared_prefix_tokens + rows_per_step * (own + 40)) * kv_per_token * 4
    step_bound_s = (weight_bytes + cache_bytes) / (rates["bandwidth_gb_s"] * 1e9)
    compute_s_per_token = 2 * params / (rates["matmul_gflop_s"] * 1e9)
    unique = stats.prompt_tokens - (stats.requests - 1) * stats.shared_prefix_tokens if stats.requests else 0
    return {
        "prompt_tokens_per_request": round(stats.prompt_tokens / max(stats.requests, 1), 1),
        "computed_prompt_tokens_per_request": round(
            (stats.prefilled_tokens + stats.padded_tokens) / max(stats.requests, 1), 1
        ),
        "own_tokens_per_request": round(unique / max(stats.requests, 1), 1),
        "shared_prefix_tokens": stats.shared_prefix_tokens,
        "decode_steps": stats.decode_steps,
        "rows_per_decode_step": round(rows_per_step, 1),
        "decode_output_tokens_per_s": round(stats.output_tokens / max(stats.decode_seconds, 1e-9), 1),
        "bandwidth_bound_output_tokens_per_s": round(rows_per_step / step_bound_s, 1),
        "compute_bound_tokens_per_s": round(1 / compute_s_per_token, 1),
        "prefill_seconds": round(stats.prefill_seconds, 2),
        "decode_seconds": round(stats.decode_seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genericize", type=int, default=40, help="requests (the demo has about 40 per source)")
    ap.add_argument("--instantiate", type=int, default=12)
    ap.add_argument("--judge", type=int, default=12)
    ap.add_argument("--old-batch", type=int, default=8, help="batch size of the `generate` path (its profile's)")
    ap.add_argument("--slots", type=int, default=32, help="rows decoding at once on the continuous path")
    ap.add_argument("--server", action="store_true", help="also a local `transformers serve` through openai")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object too")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(os.environ.get("FI_MODEL_CACHE", Path.home() / ".cache" / "fineinstructions"))
    by_stage = stage_requests(args.genericize, args.instantiate, args.judge)
    old = TransformersBackend(EMBEDDED_LLM, cache, batch_size=args.old_batch, decode="generate")
    new = TransformersBackend(EMBEDDED_LLM, cache, batch_size=args.slots)
    warm = by_stage["genericize"][:1]
    old.generate(warm)  # load both models and warm up; the prefix store starts empty below
    new.generate(warm)
    from fineinstructions_core.llm import continuous

    continuous._PREFIXES.clear()
    rates = machine_rates()
    print(f"{available_cores()} cores available; {rates}", flush=True)
    report: dict[str, Any] = {"cores": available_cores(), "machine": rates, "stages": {}}
    for stage, reqs in by_stage.items():
        if not reqs:
            continue
        before, old_results = measure(old, reqs)
        after, new_results = measure(new, reqs)
        same = sum(a.text == b.text for a, b in zip(old_results, new_results, strict=True))
        row = {
            "requests": len(reqs),
            "generate": before,
            "continuous": after,
            "speedup": round(before["seconds"] / after["seconds"], 2),
            "same_texts": same,
            "limits": limits(new, rates),
        }
        report["stages"][stage] = row
        print(stage, json.dumps(row), flush=True)
    total_old = sum(r["generate"]["seconds"] for r in report["stages"].values())
    total_new = sum(r["continuous"]["seconds"] for r in report["stages"].values())
    report["all_stages"] = {
        "generate_seconds": round(total_old, 1),
        "continuous_seconds": round(total_new, 1),
        "speedup": round(total_old / total_new, 2),
    }
    if args.server:
        report["server"] = server_rows(cache, by_stage["genericize"])
    print(
        f"\n{available_cores()} cores; memory bandwidth {rates['bandwidth_gb_s']} GB/s, fp32 matmul "
        f"{rates['matmul_gflop_s']} GFLOP/s (decode-step shape)"
    )
    print(
        "| stage | requests | path | prompt tokens | output tokens | seconds | prompt tok/s | output tok/s | "
        "speedup | same texts |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stage, r in report["stages"].items():
        for path in ("generate", "continuous"):
            m = r[path]
            print(
                f"| {stage} | {r['requests']} | {path} | {m['prompt_tokens']} | {m['output_tokens']} | "
                f"{m['seconds']:.1f} | {m['prompt_tokens_per_s']:.0f} | {m['output_tokens_per_s']:.1f} | "
                + (f"{r['speedup']:.2f}x | {r['same_texts']}/{r['requests']} |" if path == "continuous" else "| |")
            )
    a = report["all_stages"]
    print(f"| all three | | | | | {a['generate_seconds']} -> {a['continuous_seconds']} | | | {a['speedup']:.2f}x | |")
    print("\nlimits of the continuous path:")
    print(
        "| stage | prompt tokens / request | computed / request | own / request | rows per decode step | "
        "decode output tok/s | bandwidth bound | compute bound (tok/s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for stage, r in report["stages"].items():
        lim = r["limits"]
        print(
            f"| {stage} | {lim['prompt_tokens_per_request']} | {lim['computed_prompt_tokens_per_request']} | "
            f"{lim['own_tokens_per_request']} | {lim['rows_per_decode_step']} | "
            f"{lim['decode_output_tokens_per_s']} | {lim['bandwidth_bound_output_tokens_per_s']} | "
            f"{lim['compute_bound_tokens_per_s']} |"
        )
    if args.json:
        print(json.dumps(report))


def server_rows(cache: Path, reqs: list[GenerationRequest]) -> list[dict[str, Any]]:
    """The same genericize requests through a local OpenAI-compatible server at a few concurrencies."""
    from fineinstructions_core.llm.local_server import serving_missing, start_server, stop_server
    from fineinstructions_core.llm.openai_backend import OpenAIBackend

    reason = serving_missing()
    if reason:
        print(f"server rows skipped: {reason}")
        return []
    model_dir, identity = resolve_llm(EMBEDDED_LLM, cache)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url, proc = start_server(model_dir, Path(tmp) / "serve.log")
        try:
            for concurrency in (1, 8, 32):
                served = OpenAIBackend(
                    url,
                    model=str(model_dir),
                    identity_model=identity,
                    concurrency=concurrency,
                    tokenizer_path=str(model_dir),
                    timeout_s=600,
                    max_retries=0,
                )
                if concurrency == 1:
                    served.generate(reqs[:1])  # the server loads the model on first use
                m, _ = measure(served, reqs)
                rows.append({"concurrency": concurrency, **m})
                print("server", rows[-1], flush=True)
        finally:
            stop_server(proc)
    return rows


if __name__ == "__main__":
    main()
