"""Gaussian pooling against a hand computation, complexity-weighted sampling, and the token budget."""

import math

import numpy as np
import pandas as pd
import pytest

from fineinstructions_core.budget import apply_budget, format_pair
from fineinstructions_core.embed import _StreamingPool, gaussian_pool
from fineinstructions_core.match import complexity_weights, match_documents, sample_templates


def test_gaussian_pool_matches_hand_computation():
    # T=4 real tokens (a padded 5th is masked out), d=2, K=1, sigma=0.5, alpha=1: centre c_1 = 1/2 * 4 = 2.
    h = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0], [99.0, 99.0]])
    mask = np.array([1, 1, 1, 1, 0])
    w = [math.exp(-0.5 * ((t - 2) / (0.5 * 4)) ** 2) for t in (1, 2, 3, 4)]
    z = sum(w)
    local = [sum(w[i] * h[i, j] for i in range(4)) / z for j in range(2)]
    out = gaussian_pool(h, mask, K=1, sigma=0.5, alpha=1.0)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out[0], [7 / 4, 3 / 4])  # the global masked mean
    np.testing.assert_allclose(out[1], local)
    # alpha blends the local vector with the global one
    half = gaussian_pool(h, mask, K=1, sigma=0.5, alpha=0.5)
    np.testing.assert_allclose(half[1], 0.5 * out[0] + 0.5 * out[1])


def test_streaming_pool_equals_reference_over_windows():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(37, 5))
    ref = gaussian_pool(h, np.ones(37), K=5, sigma=0.05, alpha=1.0)
    pool = _StreamingPool(37, 5, 0.05, 5)
    for start in range(0, 37, 10):  # windows of 10 tokens, as a long document is encoded
        pool.add(start, h[start : start + 10])
    np.testing.assert_allclose(pool.result(1.0), ref, rtol=1e-10)


def test_local_vectors_follow_their_part_of_the_document():
    # Tokens point in direction 0 in the first half and direction 1 in the second half.
    h = np.zeros((100, 2))
    h[:50, 0] = 1
    h[50:, 1] = 1
    out = gaussian_pool(h, np.ones(100), K=5, sigma=0.05, alpha=1.0)
    assert out[1, 0] > 0.99 and out[5, 1] > 0.99


def test_complexity_weights_favour_the_target_mix():
    w = complexity_weights([1, 1, 1, 1, 3], target_complexity=[3, 3, 3, 1])
    assert w[3] > w[1]


def test_sampling_is_deterministic_thresholded_and_capped():
    sims = np.array([[0.9, 0.8, 0.1], [0.9, 0.7, 0.6], [0.2, 0.1, 0.0]])
    ids = np.array([[0, 1, 2], [0, 2, 3], [1, 2, 3]])
    complexity = np.array([1, 2, 3, 4])
    w = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    a = sample_templates(sims, ids, complexity, w, 0.5, 6, np.random.default_rng(7))
    b = sample_templates(sims, ids, complexity, w, 0.5, 6, np.random.default_rng(7))
    assert a == b
    rows = [r for _, r, _ in a]
    assert len(rows) == len(set(rows)) == 2  # vector 2 has nothing above 0.5; no template twice
    assert all(s >= 0.5 for _, _, s in a)
    assert len(sample_templates(sims, ids, complexity, w, 0.5, 1, np.random.default_rng(7))) == 1


def test_match_documents_rejects_documents_without_candidates():
    docs = pd.DataFrame({"document_id": ["d1", "d2"], "corpus": ["c", "c"], "chunk_char_centers": [[0, 1], [0, 1]]})
    templates = pd.DataFrame({"template_id": ["t0", "t1"], "complexity": [1, 2]})
    sims = np.array([[[0.9, 0.4], [0.8, 0.1]], [[0.2, 0.1], [0.1, 0.0]]])
    ids = np.array([[[0, 1], [1, 0]], [[0, 1], [1, 0]]])
    out, rej = match_documents(docs, templates, sims, ids, {1: 1.0, 2: 1.0}, 0.5, 6, seed=0)
    assert set(out["document_id"]) == {"d1"} and len(out) == 2
    assert rej.to_dict("records")[0]["reason"] == "no_template_above_threshold"
    again, _ = match_documents(docs, templates, sims, ids, {1: 1.0, 2: 1.0}, 0.5, 6, seed=0)
    pd.testing.assert_frame_equal(out, again)


def _pairs(rows):
    return pd.DataFrame(
        rows, columns=["pair_id", "document_id", "corpus", "instruction", "answer", "score", "excerpt_ratio"]
    )


def test_budget_with_rollover():
    words = len  # one token per character keeps the arithmetic visible
    p = _pairs(
        [
            ("p1", "a", "c", "x" * 5, "y" * 5, 5, 1.0),  # 'Instruction: xxxxx\n\nAnswer: yyyyy' = 33 chars
            ("p2", "a", "c", "x" * 5, "y" * 5, 4, 1.0),
            ("p3", "b", "c", "x" * 5, "y" * 5, 5, 1.0),
        ]
    )
    n = len(format_pair("x" * 5, "y" * 5))
    assert n == 33
    # doc a has room for one pair (40), leaving 7; doc b (30) + 7 rolled over = 37 >= 33
    out, rej = apply_budget(p, {"a": 40, "b": 30}, words, rollover=True)
    assert list(out["pair_id"]) == ["p1", "p3"]
    assert list(rej["pair_id"]) == ["p2"] and rej["reason"].iloc[0] == "over_budget"
    out, rej = apply_budget(p, {"a": 40, "b": 30}, words, rollover=False)
    assert list(out["pair_id"]) == ["p1"] and set(rej["pair_id"]) == {"p2", "p3"}
    assert out["text"].iloc[0] == "Instruction: xxxxx\n\nAnswer: yyyyy"


def test_budget_on_no_pairs():
    out, rej = apply_budget(_pairs([]), {}, len)
    assert out.empty and rej.empty and "text" in out.columns


@pytest.mark.parametrize("bad", [np.zeros((3, 2))])
def test_gaussian_pool_rejects_empty(bad):
    with pytest.raises(ValueError):
        gaussian_pool(bad, np.zeros(3), K=2, sigma=0.05, alpha=1.0)
