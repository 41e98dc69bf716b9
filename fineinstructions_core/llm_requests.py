"""LLM requests under a config: one builder per kind of request, shared by the stages, the distillation
loop, the student evaluation and the CLI, so a model, format or grammar switch means the same everywhere."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from . import compatibility, genericize, instantiate, judge
from .config import Config
from .llm.base import GenerationRequest
from .stage_base import constrained


def genericize_requests(cfg: Config, queries: Iterable[str]) -> list[GenerationRequest]:
    """Genericizer requests under `cfg`'s genericize model and prompt format."""
    spec = cfg.models["genericize"]
    return [
        genericize.build_request(q, spec.model, spec.max_new_tokens, spec.temperature, spec.prompt_format)
        for q in queries
    ]


def instantiation_request(cfg: Config, template: str, window: str) -> GenerationRequest:
    """One instantiation request under `cfg`'s instantiate model, prompt format and grammar switch."""
    spec = cfg.models["instantiate"]
    return instantiate.build_request(
        template,
        window,
        spec.model,
        spec.max_new_tokens,
        spec.temperature,
        constrain=constrained(spec, cfg.instantiation.constrained_excerpts),
        prompt_format=spec.prompt_format,
    )


def instantiation_requests(
    cfg: Config, matches: pd.DataFrame, texts: pd.Series, templates: pd.Series
) -> tuple[list[int], list[str], list[GenerationRequest]]:
    """(window starts, windows, requests) for template matches: each request reads the window of its
    document around the chunk that retrieved the template, under `cfg`'s instantiate model and format."""
    window_chars = cfg.instantiation.window_chars
    starts, windows, reqs = [], [], []
    for row in matches.itertuples(index=False):
        start, window = instantiate.document_window(texts[row.document_id], row.chunk_char_center, window_chars)
        starts.append(start)
        windows.append(window)
        reqs.append(instantiation_request(cfg, templates[row.template_id], window))
    return starts, windows, reqs


def judge_request(cfg: Config, instruction: str, answer: str) -> GenerationRequest:
    """One judge request (Flow Judge format) under `cfg`'s judge model and score-grammar switch."""
    spec = cfg.models["judge"]
    return judge.build_request(
        instruction,
        answer,
        spec.model,
        spec.max_new_tokens,
        constrained(spec, cfg.judge.constrained_score),
        spec.prompt_format,
    )


def compatibility_request(cfg: Config, template: str, window: str) -> GenerationRequest:
    """The judge model asked whether a template is compatible with a document window."""
    spec = cfg.models["judge"]
    return compatibility.build_request(
        template,
        window,
        spec.model,
        spec.max_new_tokens,
        constrained(spec, cfg.judge.constrained_score),
        spec.prompt_format,
    )
