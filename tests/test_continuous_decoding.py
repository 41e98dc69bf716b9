"""The continuous decode path (shared-prefix reuse, slots that refill) against transformers' `generate`, on
real prompts of the three LLM stages and the embedded model: the same greedy texts, the same cache keys,
seeded sampling that does not depend on what shared the batch, failures kept to their own request."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT

from fineinstructions_core import instantiate, llm_requests
from fineinstructions_core.config import load_config
from fineinstructions_core.llm import continuous
from fineinstructions_core.llm.base import GenerationRequest
from fineinstructions_core.llm.cache import CachedLLM, RequestCache
from fineinstructions_core.llm.models import EMBEDDED_LLM
from fineinstructions_core.llm.transformers_backend import TransformersBackend

CACHE = Path(os.environ.get("FI_MODEL_CACHE", str(Path.home() / ".cache" / "fineinstructions-tests")))
SAMPLE = ROOT / "sample_data"


def _stage_requests() -> dict[str, list[GenerationRequest]]:
    cfg = load_config(ROOT / "fineinstructions.yaml")
    queries = [json.loads(x)["question"] for x in open(SAMPLE / "queries" / "NQ-open.efficientqa.dev.1.1.jsonl")]
    docs = [json.loads(x)["text"] for x in open(SAMPLE / "documents" / "debian-handbook.jsonl", encoding="utf-8")]
    templates = ["how do I <fi>task</fi> on <fi>operating system</fi>?", "what is <fi>a software project</fi>?"]
    return {
        "genericize": llm_requests.genericize_requests(cfg, queries[:5]),
        # the excerpt-copy grammar, with the template-fill mode
        "instantiate": [
            llm_requests.instantiation_request(cfg, templates[i % 2], instantiate.document_window(docs[i], 0, 900)[1])
            for i in range(3)
        ],
        # the forced score
        "judge": [llm_requests.judge_request(cfg, queries[i], docs[i][:300]) for i in range(3)],
    }


@pytest.fixture(scope="module")
def requests_by_stage() -> dict[str, list[GenerationRequest]]:
    return _stage_requests()


@pytest.fixture(scope="module")
def reference(requests_by_stage) -> dict[str, list[str]]:
    """The `generate` path's greedy texts (batch 8, as the profile runs it)."""
    old = TransformersBackend(EMBEDDED_LLM, CACHE, batch_size=8, decode="generate")
    return {stage: [r.text for r in old.generate(reqs)] for stage, reqs in requests_by_stage.items()}


@pytest.mark.parametrize("slots", [2, 16])
def test_greedy_texts_match_the_generate_path_on_every_stage(requests_by_stage, reference, slots):
    continuous._PREFIXES.clear()
    new = TransformersBackend(EMBEDDED_LLM, CACHE, batch_size=slots)
    for stage, reqs in requests_by_stage.items():
        got = new.generate(reqs)
        assert [r.error for r in got] == [None] * len(reqs)
        assert [r.text for r in got] == reference[stage], stage
        stats = new.last_stats
        assert stats is not None and stats.output_tokens > 0
        # the instructions and worked examples are computed once, not once per request
        if stage == "genericize":
            assert stats.shared_prefix_tokens > 400
            assert stats.prefilled_tokens < stats.prompt_tokens / 3


def test_a_later_call_reuses_the_stored_prefix(requests_by_stage, reference):
    continuous._PREFIXES.clear()
    new = TransformersBackend(EMBEDDED_LLM, CACHE, batch_size=4)
    reqs = requests_by_stage["genericize"]
    new.generate(reqs[:2])
    single = new.generate(reqs[2:3])  # one request alone has no common prefix of its own
    assert new.last_stats is not None and new.last_stats.prefix_reused
    assert new.last_stats.prefilled_tokens < 60
    assert single[0].text == reference["genericize"][2]


def test_stages_taking_turns_reuse_their_own_stored_prefixes(requests_by_stage, reference):
    """genericize, judge, then genericize again: the older stored prefix is found again (not recomputed)
    and the answers stay the reference's."""
    continuous._PREFIXES.clear()
    new = TransformersBackend(EMBEDDED_LLM, CACHE, batch_size=4)
    new.generate(requests_by_stage["genericize"][:2])
    new.generate(requests_by_stage["judge"][:2])
    assert len(continuous._PREFIXES) == 2
    again = new.generate(requests_by_stage["genericize"][3:5])
    assert new.last_stats is not None and new.last_stats.prefix_reused
    assert [r.text for r in again] == reference["genericize"][3:5]


def test_request_cache_filled_by_one_path_answers_the_other(tmp_path: Path, requests_by_stage):
    reqs = requests_by_stage["judge"][:2]
    old = CachedLLM(TransformersBackend(EMBEDDED_LLM, CACHE, decode="generate"), RequestCache(tmp_path / "c.sqlite"))
    old.generate(reqs)
    new = CachedLLM(TransformersBackend(EMBEDDED_LLM, CACHE), RequestCache(tmp_path / "c.sqlite"))
    new.generate(reqs)
    assert new.stats.cache_hits == 2 and new.stats.cache_misses == 0


def test_seeded_sampling_does_not_depend_on_the_batch(requests_by_stage):
    reqs = [replace(r, temperature=0.8, seed=7) for r in requests_by_stage["genericize"][:3]]
    backend = TransformersBackend(EMBEDDED_LLM, CACHE, batch_size=4)
    together = [r.text for r in backend.generate(reqs)]
    alone = [backend.generate([r])[0].text for r in reqs]
    assert together == alone
    assert together == [r.text for r in backend.generate(reqs)]  # and again, the same


def test_a_request_whose_grammar_cannot_be_built_fails_alone(requests_by_stage, reference):
    good = requests_by_stage["genericize"][:2]
    bad = replace(good[0], constraint=("no_such_grammar",))
    got = TransformersBackend(EMBEDDED_LLM, CACHE, batch_size=4).generate([good[0], bad, good[1]])
    assert got[1].error and "no_such_grammar" in got[1].error
    assert [got[0].text, got[2].text] == reference["genericize"][:2]


def test_no_requests_and_a_zero_token_budget():
    backend = TransformersBackend(EMBEDDED_LLM, CACHE, batch_size=4)
    assert backend.generate([]) == []
    req = replace(_stage_requests()["genericize"][0], max_new_tokens=0, assistant_prefix="Template:")
    assert backend.generate([req])[0].text == "Template:"


def test_common_prefix_leaves_each_prompt_a_token_of_its_own():
    assert continuous.common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert continuous.common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert continuous.common_prefix([[9, 2], [1, 2]]) == 0
    assert continuous.common_prefix([[1, 2, 3]]) == 2
