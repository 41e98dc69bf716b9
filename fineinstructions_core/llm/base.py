"""The one interface every LLM stage talks to, whatever runs the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

ProgressFn = Callable[[int, int, int], None]
"""progress(done_requests, total_requests, completion_tokens_so_far)."""

ResultFn = Callable[[int, "GenerationResult"], None]
"""on_result(index_in_the_call, result): called as each result is final, so a caller can keep it
even if a later request of the same call fails (the request cache writes it at once)."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """A chat request plus decoding parameters; `constraint` names a structured-decoding rule.

    Constraints (see `constraints.py`): ("excerpt_copy", source_text) makes every span inside
    `<excerpt>...</excerpt>` a verbatim copy of the source; ("score", "1", ..., "5") makes the answer end
    in `<score>N</score>` with N one of the options.
    """

    model: str
    messages: tuple[ChatMessage, ...]
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    constraint: tuple[str, ...] | None = None
    assistant_prefix: str = ""

    def params(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "stop": list(self.stop),
            "constraint": list(self.constraint) if self.constraint else None,
            "assistant_prefix": self.assistant_prefix,
        }

    def messages_json(self) -> list[dict[str, str]]:
        return [asdict(m) for m in self.messages]


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None


@dataclass
class LLMStats:
    requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    by_error: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_second"] = (
            round(self.completion_tokens / self.generation_seconds, 2) if self.generation_seconds else None
        )
        return d


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    cut = len(text)
    for s in stops:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


class LLMBackend(Protocol):
    """A backend renders requests to prompts and generates for the ones the cache could not answer."""

    @property
    def identity(self) -> str:
        """Model identity for the cache key: changes whenever the weights or tokenizer change."""
        ...

    def render(self, request: GenerationRequest) -> str: ...

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressFn | None = None,
        on_result: ResultFn | None = None,
    ) -> list[GenerationResult]: ...
