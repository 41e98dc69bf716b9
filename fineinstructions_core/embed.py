"""Stage 2, the matching embedding, with Gaussian pooling exactly as the paper specifies.

Token embeddings h_1..h_T (t counted from 1 over the document's real tokens, T its length):
global vector h_bar = mean_t h_t; for k = 1..K, centre c_k = k/(K+1) * T,
w_kt = exp(-0.5 * ((t - c_k) / (sigma * T))^2) normalised over t, h_k = sum_t w_kt h_t,
h*_k = (1 - alpha) h_bar + alpha h_k. Output: [h_bar, h*_1..h*_K], each L2-normalised for cosine search.
One addition (`min_width`): the width sigma * T is at least `min_width` tokens, so a short document's
local vectors average enough tokens to mean something (at sigma = 0.05 a 100-token paragraph's would
average about five) and tend to its global vector as it gets shorter.

Documents longer than the encoder's window are encoded window by window; the per-token embeddings of
all windows form one sequence over the whole document and are pooled as above. The pooling is
streamed (running weighted sums), so a book never needs all its token vectors in memory at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .llm.models import EMBEDDED_EMBEDDER, embedded_embedder_dir, resolve_local_or_hub, weights_identity

log = logging.getLogger(__name__)
_LOADED: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def local_width(T: int, sigma: float, min_width: float = 0.0) -> float:
    """The Gaussians' standard deviation in tokens: sigma * T, never under `min_width`."""
    return max(sigma * T, min_width)


def gaussian_weights(T: int, K: int, sigma: float, min_width: float = 0.0) -> np.ndarray:
    """(K, T) normalised weights over token positions t = 1..T."""
    t = np.arange(1, T + 1, dtype=np.float64)
    centers = np.arange(1, K + 1, dtype=np.float64) / (K + 1) * T
    w = np.exp(-0.5 * ((t[None, :] - centers[:, None]) / local_width(T, sigma, min_width)) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def gaussian_pool(
    hidden: np.ndarray, mask: np.ndarray, K: int, sigma: float, alpha: float, min_width: float = 0.0
) -> np.ndarray:
    """Reference implementation on one sequence: hidden (L, d), mask (L,) -> (K+1, d), not normalised.

    Masked positions are dropped first, so t and T count real tokens only.
    """
    h = hidden[mask.astype(bool)].astype(np.float64)
    T = h.shape[0]
    if T == 0:
        raise ValueError("cannot pool an empty sequence")
    h_bar = h.mean(axis=0)
    local = gaussian_weights(T, K, sigma, min_width) @ h
    blended = (1 - alpha) * h_bar[None, :] + alpha * local
    return np.vstack([h_bar[None, :], blended])


def _normalize(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(n == 0, 1, n)).astype(np.float32)


@dataclass
class PooledDocument:
    vectors: np.ndarray  # (K+1, d), L2-normalised
    n_tokens: int
    n_windows: int
    chunk_char_centers: list[int]  # character offset of each vector's centre (global: the middle)


class _StreamingPool:
    """Running sums for Gaussian pooling when tokens arrive window by window."""

    def __init__(self, T: int, K: int, sigma: float, dim: int, min_width: float = 0.0):
        self.T, self.K, self.width = T, K, local_width(T, sigma, min_width)
        self.centers = np.arange(1, K + 1, dtype=np.float64) / (K + 1) * T
        self.sum_h = np.zeros(dim)
        self.sum_wh = np.zeros((K, dim))
        self.sum_w = np.zeros(K)

    def add(self, start: int, h: np.ndarray) -> None:
        """Tokens at 0-based positions start..start+len(h)-1, i.e. t = start+1..."""
        h = h.astype(np.float64)
        self.sum_h += h.sum(axis=0)
        if self.K == 0:  # plain mean pooling
            return
        t = np.arange(start + 1, start + 1 + h.shape[0], dtype=np.float64)
        w = np.exp(-0.5 * ((t[None, :] - self.centers[:, None]) / self.width) ** 2)
        self.sum_wh += w @ h
        self.sum_w += w.sum(axis=1)

    def result(self, alpha: float) -> np.ndarray:
        h_bar = self.sum_h / self.T
        if self.K == 0:
            return h_bar[None, :]
        local = self.sum_wh / self.sum_w[:, None]
        return np.vstack([h_bar[None, :], (1 - alpha) * h_bar[None, :] + alpha * local])


class Embedder:
    """A transformers encoder used for template descriptions (mean pooling) and documents (Gaussian)."""

    def __init__(self, model: str = EMBEDDED_EMBEDDER, batch_size: int = 32, window: int | None = None):
        embedded = model in (EMBEDDED_EMBEDDER, "embedded:all-MiniLM-L6-v2")
        path = embedded_embedder_dir() if embedded else resolve_local_or_hub(model)[0]
        self.path = path
        weights = weights_identity(path)
        self.identity = f"{model}@{weights}" if weights else model
        self.batch_size = batch_size
        self.tokenizer, self.model = self._load(path)
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        st_len = _sentence_transformers_max_len(path)
        self.window = int(window or min(limit, st_len or limit))
        self.dim = int(self.model.config.hidden_size)

    @staticmethod
    def _load(path: Path) -> tuple[Any, Any]:
        with _LOCK:
            key = str(path)
            if key not in _LOADED:
                from transformers import AutoModel, AutoTokenizer

                tok = AutoTokenizer.from_pretrained(path)
                model = AutoModel.from_pretrained(path)
                model.eval()
                _LOADED[key] = (tok, model)
            return _LOADED[key]

    def _encode(self, batch_ids: list[list[int]]) -> list[np.ndarray]:
        """Token embeddings for already-tokenized windows (special tokens added here, dropped after)."""
        import torch

        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        seqs = [[cls, *ids, sep] for ids in batch_ids]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attn).last_hidden_state.numpy()
        return [out[i, 1 : 1 + len(ids)] for i, ids in enumerate(batch_ids)]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence vectors (mean over tokens, truncated to one window), L2-normalised."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.window,
                return_tensors="pt",
            )
            with torch.inference_mode():
                h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
        return _normalize(np.vstack(out))

    def embed_documents(
        self,
        texts: Sequence[str],
        K: int,
        sigma: float,
        alpha: float,
        progress: Callable[[int, int], None] | None = None,
        pooling: str = "gaussian",
        min_width: float = 0.0,
    ) -> list[PooledDocument]:
        """K+1 vectors per document over its whole token sequence (or 1 with pooling='mean')."""
        content = self.window - 2
        docs = []
        jobs: list[tuple[int, int, list[int]]] = []  # (doc index, start position, window ids)
        for di, text in enumerate(texts):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            if not ids:  # e.g. only characters the tokenizer drops
                ids, offsets = [self.tokenizer.unk_token_id], [(0, len(text))]
            docs.append((len(ids), offsets))
            for s in range(0, len(ids), content):
                jobs.append((di, s, ids[s : s + content]))
        if pooling not in ("gaussian", "mean"):
            raise ValueError(f"pooling must be 'gaussian' or 'mean', not {pooling!r}")
        k_eff = K if pooling == "gaussian" else 0
        pools = [_StreamingPool(T, k_eff, sigma, self.dim, min_width) for T, _ in docs]
        # Windows of similar length batch together; each window's pooling contribution is additive.
        jobs.sort(key=lambda j: len(j[2]))
        for b in range(0, len(jobs), self.batch_size):
            batch = jobs[b : b + self.batch_size]
            for (di, start, _), h in zip(batch, self._encode([j[2] for j in batch]), strict=True):
                pools[di].add(start, h)
            if progress:
                progress(min(b + self.batch_size, len(jobs)), len(jobs))
        result = []
        for (T, offsets), pool in zip(docs, pools, strict=True):
            vecs = pool.result(alpha)
            centers = [int(T / 2)] + [int(k / (K + 1) * T) for k in range(1, k_eff + 1)]
            chars = [offsets[min(max(c - 1, 0), T - 1)][0] for c in centers]
            result.append(PooledDocument(_normalize(vecs), T, -(-T // content), chars))
        return result


def _sentence_transformers_max_len(path: Path) -> int | None:
    cfg = path / "sentence_bert_config.json"
    if cfg.exists():
        import json

        return int(json.loads(cfg.read_text()).get("max_seq_length", 0)) or None
    return None
