"""In-process generation with transformers: CPU or GPU, with structured-decoding constraints.

Two decode paths over the same rendering and constraints. `continuous` (the default, `continuous.py`)
reuses the key/value cache of the prompts' shared prefix and batches continuously; `generate` is
transformers' own `generate` over length-sorted batches, kept as the reference the continuous path is
measured and checked against (same greedy texts, same cache keys: the path is not part of a request).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import TRANSFORMERS_DECODE_PATHS as DECODE_PATHS
from .base import GenerationRequest, GenerationResult, ProgressFn, ResultFn, cut_at_stop
from .constraints import Constraint, build_constraint
from .continuous import (
    ATTENTION,
    ContinuousDecoder,
    DecodeStats,
    register_attention,
    unsupported_reason,
)
from .models import resolve_llm

log = logging.getLogger(__name__)

_LOADED: dict[tuple[str, str], tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or `taskset`'s share),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _load(path: Path, attention: str = "sdpa") -> tuple[Any, Any]:
    """One copy of each model per process and attention implementation, shared by every stage that uses it
    (the continuous path runs its own attention; a process using both paths holds the weights twice)."""
    key = (str(path), attention)
    with _LOCK:
        if key not in _LOADED:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if device == "cpu":
                torch.set_num_threads(available_cores())
                log.info(
                    "transformers backend: %d CPU thread(s), the cores available to this process",
                    torch.get_num_threads(),
                )
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            if attention == ATTENTION:
                register_attention()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device)
            model.eval()
            _LOADED[key] = (tokenizer, model)
        return _LOADED[key]


class _ConstraintProcessor:
    """A logits processor applying one constraint per batch row."""

    def __init__(self, constraints: list[Constraint | None], prompt_len: int, max_new_tokens: int):
        self.constraints = constraints
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_len
        for row, c in enumerate(self.constraints):
            if c is None:
                continue
            if step > 0:
                c.advance(int(input_ids[row, -1]))
            if self.max_new_tokens - step <= c.reserve():
                c.force_finish()
            allowed = c.allowed()
            if allowed is not None:
                keep = torch.full_like(scores[row], float("-inf"))
                idx = torch.tensor(sorted(set(allowed)), dtype=torch.long, device=scores.device)
                keep[idx] = scores[row, idx]
                scores[row] = keep
            else:
                banned = c.banned()
                if banned:
                    scores[row, banned] = float("-inf")
        return scores


class TransformersBackend:
    """`batch_size` is the number of rows decoding at once (slots, on the continuous path)."""

    def __init__(self, model: str, cache_dir: Path, batch_size: int = 8, decode: str = "continuous"):
        if decode not in DECODE_PATHS:
            raise ValueError(f"unknown decode path {decode!r} for the transformers backend (one of {DECODE_PATHS})")
        self.model_name = model
        self.path, self._identity = resolve_llm(model, cache_dir)
        self.batch_size = batch_size
        self.decode = decode
        self.last_stats: DecodeStats | None = None
        self._tokenizer: Any = None
        self._model: Any = None

    @property
    def identity(self) -> str:
        return self._identity

    def describe(self) -> str:
        """What runs the requests, for the stage's log: the decode path, its rows and the threads."""
        import torch

        where = "GPU" if torch.cuda.is_available() else f"{available_cores()} CPU thread(s), the cores available"
        return f"transformers ({self.decode} decoding, {self.batch_size} rows at once, {where})"

    def _ensure(self) -> tuple[Any, Any]:
        if self._model is None and self.decode == "continuous":
            from transformers import AutoConfig, GenerationConfig

            try:
                generation = GenerationConfig.from_pretrained(self.path)
            except OSError:  # no generation_config.json: transformers' defaults
                generation = GenerationConfig()
            reason = unsupported_reason(AutoConfig.from_pretrained(self.path), generation)
            if reason:
                log.warning("%s: continuous decoding is off, using generate (%s)", self.model_name, reason)
                self.decode = "generate"
        if self._model is None:
            self._tokenizer, self._model = _load(self.path, ATTENTION if self.decode == "continuous" else "sdpa")
        return self._tokenizer, self._model

    def render(self, request: GenerationRequest) -> str:
        tokenizer, _ = self._ensure()
        messages = request.messages_json()
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return text + request.assistant_prefix

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressFn | None = None,
        on_result: ResultFn | None = None,
    ) -> list[GenerationResult]:
        tokenizer, _ = self._ensure()  # may turn continuous decoding off for this model
        if self.decode == "continuous":
            return self._generate_continuous(requests, progress, on_result)
        prompts = [self.render(r) for r in requests]
        lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        # Similar lengths batch together, so padding wastes little compute.
        order = sorted(range(len(requests)), key=lambda i: lengths[i])
        results: list[GenerationResult | None] = [None] * len(requests)
        done, tokens = 0, 0
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            groups: dict[tuple, list[int]] = {}
            for i in idx:
                r = requests[i]
                groups.setdefault((r.max_new_tokens, r.temperature, r.seed, r.stop), []).append(i)
            for group in groups.values():
                try:
                    out = self._generate_batch([requests[i] for i in group], [prompts[i] for i in group])
                except Exception as exc:  # one bad batch must not lose the others
                    log.exception("generation failed for a batch of %d", len(group))
                    out = [GenerationResult("", error=f"{type(exc).__name__}: {exc}") for _ in group]
                for i, r in zip(group, out, strict=True):
                    results[i] = r
                    tokens += r.completion_tokens
                    if on_result:
                        on_result(i, r)
            done += len(idx)
            if progress:
                progress(done, len(requests), tokens)
        return [r for r in results if r is not None]

    def _generate_continuous(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressFn | None,
        on_result: ResultFn | None,
    ) -> list[GenerationResult]:
        tokenizer, model = self._ensure()
        prompts = [tokenizer(self.render(r), add_special_tokens=False).input_ids for r in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        constraints: list[Constraint | None] = []
        for i, r in enumerate(requests):
            if r.max_new_tokens <= 0:
                results[i] = GenerationResult(r.assistant_prefix, prompt_tokens=len(prompts[i]))
                constraints.append(None)
                continue
            try:
                constraints.append(build_constraint(r.constraint, tokenizer, tokenizer.eos_token_id))
            except Exception as exc:  # a grammar that cannot be built fails its own request only
                results[i] = GenerationResult("", error=f"{type(exc).__name__}: {exc}")
                constraints.append(None)
        todo = [i for i in range(len(requests)) if results[i] is None]
        counts = {"done": len(requests) - len(todo), "tokens": 0}

        def on_done(j: int, result: GenerationResult) -> None:
            i = todo[j]
            results[i] = result
            counts["done"] += 1
            counts["tokens"] += result.completion_tokens
            if on_result:
                on_result(i, result)
            if progress:
                progress(counts["done"], len(requests), counts["tokens"])

        for i in range(len(requests)):
            if results[i] is not None and on_result:
                on_result(i, results[i])
        decoder = ContinuousDecoder(model, tokenizer, str(self.path), self.batch_size)
        import torch

        with torch.inference_mode():
            self.last_stats = decoder.run(
                [requests[i] for i in todo], [prompts[i] for i in todo], [constraints[i] for i in todo], on_done
            )
        return [r if r is not None else GenerationResult("", error="not generated") for r in results]

    def _generate_batch(self, requests: list[GenerationRequest], prompts: list[str]) -> list[GenerationResult]:
        import torch
        from transformers import LogitsProcessorList

        tokenizer, model = self._ensure()
        first = requests[0]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        prompt_len = enc.input_ids.shape[1]
        constraints = [build_constraint(r.constraint, tokenizer, tokenizer.eos_token_id) for r in requests]
        kwargs: dict[str, Any] = {
            "max_new_tokens": first.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if first.temperature > 0:
            torch.manual_seed(first.seed)
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=0.95)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if first.stop:
            kwargs.update(stop_strings=list(first.stop), tokenizer=tokenizer)
        if any(c is not None for c in constraints):
            kwargs["logits_processor"] = LogitsProcessorList(
                [_ConstraintProcessor(constraints, prompt_len, first.max_new_tokens)]
            )
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        log.debug("batch of %d in %.1fs", len(requests), time.perf_counter() - start)
        results = []
        for row, req in enumerate(requests):
            gen = out[row, prompt_len:].tolist()
            n = 0
            while n < len(gen) and gen[n] not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                n += 1
            text = tokenizer.decode(gen[:n], skip_special_tokens=True)
            text = cut_at_stop(text, req.stop)
            results.append(
                GenerationResult(
                    text=req.assistant_prefix + text,
                    prompt_tokens=int(enc.attention_mask[row].sum()),
                    completion_tokens=min(n + 1, len(gen)),
                )
            )
        return results
