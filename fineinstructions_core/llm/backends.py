"""Choosing a backend for a stage from its config: the prompt format stays with the model, not the backend."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelSpec
from .base import LLMBackend
from .models import resolve_llm


def make_backend(spec: ModelSpec, cache_dir: Path) -> LLMBackend:
    """Backends are imported only when selected, so vLLM or an HTTP client is needed only where used."""
    if spec.backend == "transformers":
        from .transformers_backend import TransformersBackend

        return TransformersBackend(spec.model, cache_dir, batch_size=spec.batch_size, **spec.options)
    if spec.backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(spec.model, cache_dir, batch_size=spec.batch_size, **spec.options)
    if spec.backend == "openai":
        options = dict(spec.options)
        if "base_url" not in options:
            raise ValueError(f"the openai backend for model {spec.model!r} needs base_url in its model profile")
        if str(options.get("tokenizer_path", "")).startswith("embedded:"):
            # Render with the embedded model's own chat template, as the in-process backend does.
            options["tokenizer_path"] = str(resolve_llm(options["tokenizer_path"], cache_dir)[0])
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(model=spec.model, **options)
    raise ValueError(f"unknown LLM backend {spec.backend!r} (available: transformers, vllm, openai)")
