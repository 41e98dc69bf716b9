"""Offline batched generation on a GPU with `vllm.LLM` (optional extra: `pip install .[gpu]`).

vLLM is imported only when this backend is selected, so CPU installs never need it. Prompts are rendered
with the model's own chat template through transformers, exactly as the in-process backend renders them,
so both backends share request-cache entries for the same weights and prompts.

Automatic prefix caching is on unless the profile says otherwise (`enable_prefix_caching: false`): a
stage's prompts share their instructions and worked examples, and vLLM then computes that prefix's
key/value blocks once and reuses them for every request (its scheduler batches continuously as well).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import GenerationRequest, GenerationResult, ProgressFn, ResultFn
from .models import resolve_llm


def sampling_params(request: GenerationRequest) -> dict[str, Any]:
    """GenerationRequest -> keyword arguments of `vllm.SamplingParams` (greedy when temperature is 0)."""
    if request.constraint:
        raise ValueError(
            f"the vllm backend cannot apply the {request.constraint[0]!r} decoding constraint; set "
            "instantiation.constrained_excerpts / judge.constrained_score to false for this stage"
        )
    params: dict[str, Any] = {
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "seed": request.seed,
        "stop": list(request.stop) or None,
    }
    if request.temperature > 0:
        params["top_p"] = 0.95
    return params


def _vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("the vllm backend needs vLLM on a GPU machine: pip install '.[gpu]'") from exc
    return vllm


class VLLMBackend:
    def __init__(self, model: str, cache_dir: Path, batch_size: int = 256, **engine_args: Any):
        self.path, self._identity = resolve_llm(model, cache_dir)
        self.batch_size = batch_size
        self.engine_args = {"enable_prefix_caching": True, **engine_args}
        self._tokenizer: Any = None
        self._llm: Any = None

    @property
    def identity(self) -> str:
        return self._identity

    def _tok(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def render(self, request: GenerationRequest) -> str:
        text = self._tok().apply_chat_template(request.messages_json(), tokenize=False, add_generation_prompt=True)
        return text + request.assistant_prefix

    def _engine(self) -> Any:
        if self._llm is None:
            self._llm = _vllm().LLM(model=str(self.path), **self.engine_args)
        return self._llm

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressFn | None = None,
        on_result: ResultFn | None = None,
    ) -> list[GenerationResult]:
        params = [_vllm().SamplingParams(**sampling_params(r)) for r in requests]  # validate all before any work
        prompts = [self.render(r) for r in requests]
        llm = self._engine()
        results: list[GenerationResult] = []
        tokens = 0
        for b in range(0, len(requests), self.batch_size):
            outs = llm.generate(prompts[b : b + self.batch_size], params[b : b + self.batch_size], use_tqdm=False)
            for req, out in zip(requests[b : b + self.batch_size], outs, strict=True):
                gen = out.outputs[0]
                results.append(
                    GenerationResult(
                        text=req.assistant_prefix + gen.text,
                        prompt_tokens=len(out.prompt_token_ids or []),
                        completion_tokens=len(gen.token_ids),
                    )
                )
                tokens += len(gen.token_ids)
                if on_result:
                    on_result(len(results) - 1, results[-1])
            if progress:
                progress(len(results), len(requests), tokens)
        return results
