"""Backend selection from config, and the vLLM backend's prompt and parameter mapping (no GPU needed)."""

import importlib.util
import os
from pathlib import Path

import pytest

from fineinstructions_core.config import ConfigError, ModelSpec, load_config
from fineinstructions_core.genericize import build_request
from fineinstructions_core.llm.backends import make_backend
from fineinstructions_core.llm.base import ChatMessage, GenerationRequest
from fineinstructions_core.llm.transformers_backend import TransformersBackend
from fineinstructions_core.llm.vllm_backend import VLLMBackend, sampling_params

CACHE = Path(os.environ["FI_MODEL_CACHE"])
MODEL = "embedded:smollm2-135m-instruct"


def test_sampling_params_mapping():
    req = GenerationRequest(
        model="m", messages=(ChatMessage("user", "hi"),), max_new_tokens=33, temperature=0.0, seed=7, stop=("\n\n",)
    )
    assert sampling_params(req) == {"max_tokens": 33, "temperature": 0.0, "seed": 7, "stop": ["\n\n"]}
    warm = GenerationRequest(model="m", messages=(), temperature=0.7)
    assert sampling_params(warm)["top_p"] == 0.95 and sampling_params(warm)["stop"] is None
    with pytest.raises(ValueError, match="excerpt_copy"):
        sampling_params(GenerationRequest(model="m", messages=(), constraint=("excerpt_copy", "doc")))


def test_vllm_renders_exactly_like_the_in_process_backend():
    req = build_request("who wrote pride and prejudice", MODEL, 64, 0.0)
    vllm_backend = VLLMBackend(MODEL, CACHE)
    local = TransformersBackend(MODEL, CACHE)
    assert vllm_backend.render(req) == local.render(req)
    assert vllm_backend.identity == local.identity  # same weights -> same cache entries
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match=r"pip install '\.\[gpu\]'"):
            vllm_backend.generate([req])


def test_backend_selection_and_errors(tiny_project):
    assert isinstance(make_backend(ModelSpec("transformers", MODEL, 8), CACHE), TransformersBackend)
    assert isinstance(make_backend(ModelSpec("vllm", MODEL, 8), CACHE), VLLMBackend)
    with pytest.raises(ValueError, match="base_url"):
        make_backend(ModelSpec("openai", "served-model", 8), CACHE)
    with pytest.raises(ConfigError, match="backend must be one of"):
        load_config(tiny_project, {"model_profiles": {"embedded": {"judge": {"backend": "nope", "model": "x"}}}})
    cfg = load_config(
        tiny_project,
        {
            "model_profiles": {
                "embedded": {
                    "judge": {"backend": "openai", "model": "smol", "base_url": "http://127.0.0.1:9", "concurrency": 4}
                }
            }
        },
    )
    assert cfg.models["judge"].options == {"base_url": "http://127.0.0.1:9", "concurrency": 4}
