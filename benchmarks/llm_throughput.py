"""Output tokens/s of the embedded SmolLM2-135M on instantiation requests: the in-process transformers
backend at batch sizes 1, 8, 32 and a local OpenAI-compatible server (`transformers serve`) through the
openai backend at concurrency 1, 8, 32, side by side in one run on the same requests.

Requests are real instantiation prompts (shipped templates' style x shipped Debian handbook windows),
greedy, unconstrained (a generic server cannot apply the grammar), `--max-new-tokens` each. The request
cache is bypassed: every configuration generates every request. The server is started once, warmed up,
and reused for all concurrencies; the in-process model is loaded once and warmed up.

    python benchmarks/llm_throughput.py [--requests 32] [--max-new-tokens 48] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fineinstructions_core import instantiate
from fineinstructions_core.llm.base import GenerationRequest, GenerationResult
from fineinstructions_core.llm.local_server import serving_missing, start_server, stop_server
from fineinstructions_core.llm.models import EMBEDDED_LLM, resolve_llm
from fineinstructions_core.llm.openai_backend import OpenAIBackend
from fineinstructions_core.llm.transformers_backend import TransformersBackend

ROOT = Path(__file__).resolve().parent.parent / "sample_data" / "documents"
TEMPLATES = [
    "how do I <fi>task</fi> on <fi>operating system</fi>?",
    "what is <fi>a software project</fi>?",
    "Why would I use <fi>a tool</fi> instead of <fi>another tool</fi>?",
    "<fi>type of error</fi> in <fi>kind of program</fi>",
]


def requests(n: int, max_new_tokens: int) -> list[GenerationRequest]:
    docs = [json.loads(x)["text"] for x in open(ROOT / "debian-handbook.jsonl", encoding="utf-8")]
    out = []
    for i in range(n):
        _, window = instantiate.document_window(docs[i % len(docs)], 0, 1200)
        template = TEMPLATES[i % len(TEMPLATES)]
        out.append(instantiate.build_request(template, window, EMBEDDED_LLM, max_new_tokens, 0.0, constrain=False))
    return out


def measure(generate, reqs: list[GenerationRequest]) -> dict[str, float]:
    start = time.perf_counter()
    results: list[GenerationResult] = generate(reqs)
    wall = time.perf_counter() - start
    errors = sum(1 for r in results if r.error)
    tokens = sum(r.completion_tokens for r in results)
    return {"seconds": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(os.environ.get("FI_MODEL_CACHE", Path.home() / ".cache" / "fineinstructions"))
    model_dir, identity = resolve_llm(EMBEDDED_LLM, cache)
    reqs = requests(args.requests, args.max_new_tokens)
    rows: list[dict] = []

    local = TransformersBackend(EMBEDDED_LLM, cache, batch_size=8)
    local.generate(reqs[:2])  # load and warm up
    for size in args.sizes:
        local.batch_size = size
        rows.append(
            {"backend": "transformers (in process)", "batch/concurrency": size, **measure(local.generate, reqs)}
        )
        print(rows[-1], flush=True)

    reason = serving_missing()
    if reason:
        print(f"server rows skipped: {reason}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            url, proc = start_server(model_dir, Path(tmp) / "serve.log")
            try:
                for size in args.sizes:
                    served = OpenAIBackend(
                        url,
                        model=str(model_dir),
                        identity_model=identity,
                        concurrency=size,
                        tokenizer_path=str(model_dir),
                        timeout_s=600,
                        max_retries=0,
                    )
                    if size == args.sizes[0]:
                        served.generate(reqs[:2])  # the server loads the model on first use
                    rows.append(
                        {
                            "backend": "openai -> transformers serve",
                            "batch/concurrency": size,
                            **measure(served.generate, reqs),
                        }
                    )
                    print(rows[-1], flush=True)
            finally:
                stop_server(proc)

    base = rows[0]["tokens_per_s"]
    print(
        f"\n{args.requests} instantiation requests, up to {args.max_new_tokens} new tokens each, {os.cpu_count()} CPUs"
    )
    print("| backend | batch / concurrency | output tokens | seconds | output tokens/s | vs in-process batch 1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['batch/concurrency']} | {r['output_tokens']} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x |"
            + (f" ({r['errors']} errors)" if r["errors"] else "")
        )
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
