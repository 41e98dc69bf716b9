"""Checks a run makes before any stage runs: every input glob matches a file, every model is there.

The config itself is validated when it loads (`config.py`); these are the facts about the machine a
config points at. Each problem names the config key it comes from, and all of them are reported at
once, so a typo'd path or a missing model costs seconds, not a half-rewritten lake.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import EMBEDDED_EMBEDDER, EMBEDDED_LLM, LLM_STAGES, Config
from .llm.models import ModelNotAvailable, embedded_embedder_dir, embedded_gguf, resolve_local_or_hub


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def input_problems(cfg: Config) -> list[Problem]:
    """Query sources, template sources and corpora whose path matches no file."""
    problems = []
    for i, s in enumerate(cfg.query_sources):
        if not s.files(cfg.root):
            problems.append(Problem(f"query_sources[{i}].path", f"{s.path!r} matches no file under {cfg.root}"))
    for i, t in enumerate(cfg.template_sources):
        if not t.files(cfg.root):
            problems.append(Problem(f"template_sources[{i}].path", f"{t.path!r} matches no file under {cfg.root}"))
    for i, c in enumerate(cfg.corpora):
        if not c.files(cfg.root):
            problems.append(Problem(f"corpora[{i}].path", f"{c.path!r} matches no file under {cfg.root}"))
    labelled = cfg.judge.labelled_set
    if labelled and not cfg.path(labelled).is_file():
        problems.append(Problem("judge.labelled_set", f"{labelled!r} is not a file under {cfg.root}"))
    g = cfg.gates
    if g.relevance and g.relevance_threshold == "calibrated" and not labelled:
        problems.append(
            Problem(
                "gates.relevance_threshold",
                "`calibrated` needs judge.labelled_set (its dev split's good pairs); set one or give a number",
            )
        )
    return problems


def _model_problem(key: str, model: str) -> Problem | None:
    try:
        if model == EMBEDDED_LLM:
            embedded_gguf()
        elif model.lower() == EMBEDDED_EMBEDDER:
            embedded_embedder_dir()
        else:
            resolve_local_or_hub(model)
    except ModelNotAvailable as exc:
        return Problem(key, str(exc))
    return None


def model_problems(cfg: Config, include_distillation: bool = False) -> list[Problem]:
    """Models the run would load that are not installed, not a local directory, nor in the local cache.

    Models behind an OpenAI-compatible server are the server's business and are not checked here.
    """
    wanted: list[tuple[str, str]] = []
    profiles = [cfg.profile_name]
    if include_distillation:
        profiles.append(cfg.distillation.teacher_profile)
    for name in dict.fromkeys(profiles):
        c = cfg.with_profile(name) if name != cfg.profile_name else cfg
        wanted.append((f"model_profiles.{name}.embedder", c.embedder))
        for stage in LLM_STAGES:
            spec = c.models[stage]
            if spec.backend != "openai":
                wanted.append((f"model_profiles.{name}.{stage}.model", spec.model))
    if include_distillation:
        wanted.append(("distillation.student", cfg.distillation.student))
        wanted.append(("distillation.embedding.base", cfg.distillation.embedding.base))
    seen: dict[str, Problem | None] = {}
    problems = []
    for key, model in wanted:
        if model not in seen:
            seen[model] = _model_problem(key, model)
        if seen[model] is not None:
            problems.append(Problem(key, seen[model].message))  # type: ignore[union-attr]
    return problems


def preflight(cfg: Config, include_distillation: bool = False) -> list[Problem]:
    """Every problem that would stop the run, before it starts."""
    return input_problems(cfg) + model_problems(cfg, include_distillation)
