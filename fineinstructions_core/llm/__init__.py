"""LLM layer: one request/result interface, backends behind it, and the persistent request cache."""

from .base import ChatMessage, GenerationRequest, GenerationResult, LLMBackend, LLMStats
from .cache import CachedLLM, RequestCache

__all__ = [
    "CachedLLM",
    "ChatMessage",
    "GenerationRequest",
    "GenerationResult",
    "LLMBackend",
    "LLMStats",
    "RequestCache",
]
