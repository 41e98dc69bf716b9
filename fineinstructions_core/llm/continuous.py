"""Continuous batching with shared-prefix reuse: the in-process decode loop.

Why: a stage's prompts open with the same long instructions and worked examples (426 of a genericize
prompt's 443 tokens), and `generate` recomputes them for every request, pads each batch to its longest
prompt and keeps finished rows decoding until the longest is done. Here, as in vLLM:

- the key/value cache of the prompts' longest common token prefix is computed once per process and
  model (kept in a small LRU store) and copied into every request's rows, so a request prefills only its
  own tokens;
- a fixed number of slots decode together; a row that ends leaves at once and a waiting request is
  prefilled into its place; results are handed back as each row ends;
- the KV cache is one preallocated slab per layer that grows by doubling, so a decode step writes one
  column instead of copying the whole cache (what `DynamicCache`'s `torch.cat` does every step).

Rows are right-aligned in the slab: each row's tokens end at the shared write column, the columns to
their left are masked, and positions come from each row's own token count. Greedy decoding gives the
same tokens as `generate` on the full prompts (up to float ties); sampling draws from a generator seeded
per request, so a sampled answer does not depend on which requests shared its batch.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import GenerationRequest, GenerationResult, cut_at_stop
from .constraints import Constraint

log = logging.getLogger(__name__)

STOP_WINDOW = 24
"""Generated tokens decoded to look for a stop string (it is checked after every token)."""
MIN_SHARED_PREFIX = 32
"""Shorter common prefixes are not worth a cache entry."""
PREFIX_STORE_SIZE = 4

_PREFIXES: OrderedDict[tuple[str, tuple[int, ...]], list[tuple[Any, Any]]] = OrderedDict()
_PREFIX_LOCK = threading.Lock()


@dataclass
class DecodeStats:
    """What the loop computed, to compare with what the requests needed."""

    requests: int = 0
    prompt_tokens: int = 0  # the requests' full prompts
    prefilled_tokens: int = 0  # prompt tokens actually computed (prefix once, plus each request's own)
    padded_tokens: int = 0  # pad positions computed alongside
    shared_prefix_tokens: int = 0
    prefix_reused: bool = False
    decode_steps: int = 0
    output_tokens: int = 0
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0


@dataclass
class _Row:
    index: int
    request: GenerationRequest
    prompt: list[int]
    constraint: Constraint | None
    generator: Any
    generated: list[int] = field(default_factory=list)
    position: int = 0  # the position of the next token fed to the model
    done: bool = False


ATTENTION = "fi_shared_prefix"
"""The attention implementation the continuous path's model runs with (see `shared_prefix_attention`)."""


def shared_prefix_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: list[tuple[Any, Any]] | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention over [the shared prefix | each row's own columns], the prefix read once for all rows.

    Every row's queries attend to the one stored copy of the prefix's keys and values (one matmul for
    the whole batch) and to their own columns (masked: padding, causality), and the two softmax parts are
    merged exactly by their running maxima and sums, as cascade attention does. So the prefix is neither
    copied into each row's cache nor re-read per row at every step. Grouped-query heads are packed so that
    keys and values are never repeated per head. Without a prefix this is transformers' SDPA attention.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for unsupported in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(unsupported) is not None and shared_prefix is not None:
            raise ValueError(f"shared-prefix attention does not implement {unsupported}")
    if shared_prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    pk, pv = shared_prefix[module.layer_idx]  # [1, kv_heads, P, dim]
    b, heads, q_len, dim = query.shape
    if q_len > 1:  # a prefill: its many queries amortize one copy of the prefix, and SDPA's kernel is faster
        own = key.shape[2]
        if attention_mask is None:
            i = torch.arange(q_len, device=query.device).view(q_len, 1) + (own - q_len)
            attention_mask = (torch.arange(own, device=query.device).view(1, own) <= i).view(1, 1, q_len, own)
        keep = attention_mask[..., -own:].expand(b, 1, q_len, own)
        seen = torch.ones((b, 1, q_len, pk.shape[2]), dtype=torch.bool, device=query.device)
        mask = torch.cat([seen, keep if keep.dtype == torch.bool else keep == 0], dim=-1)
        key = torch.cat([pk.expand(b, -1, -1, -1), key], dim=2)
        value = torch.cat([pv.expand(b, -1, -1, -1), value], dim=2)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_heads, own = key.shape[1], key.shape[2]
    rep = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(b, kv_heads, rep * q_len, dim)  # heads of one group act as extra query rows
    # scores, maxima, exponentials and sums in fp32 (bf16 on a GPU), as SDPA's kernels accumulate
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [b, kv_heads, rep*q, own]
    if attention_mask is None:  # no padding: plain causality over the own columns
        i = torch.arange(q_len, device=query.device).view(q_len, 1) + (own - q_len)
        attention_mask = (torch.arange(own, device=query.device).view(1, own) <= i).view(1, 1, q_len, own)
    keep = attention_mask[..., -own:]
    if keep.dtype == torch.bool:
        keep = keep.unsqueeze(2).expand(keep.shape[0], 1, rep, q_len, own).reshape(keep.shape[0], 1, rep * q_len, own)
        scores = scores.masked_fill(~keep, float("-inf"))
    else:
        add = keep.unsqueeze(2).expand(keep.shape[0], 1, rep, q_len, own).reshape(keep.shape[0], 1, rep * q_len, own)
        scores = scores + add
    qp = q.transpose(0, 1).reshape(kv_heads, b * rep * q_len, dim)
    pre = torch.matmul(qp, pk[0].transpose(-1, -2)).float() * scale  # [kv_heads, b*rep*q, P]
    top = torch.maximum(scores.amax(-1), pre.view(kv_heads, b, rep * q_len, -1).amax(-1).transpose(0, 1))
    e_own = torch.exp(scores - top.unsqueeze(-1))
    e_pre = torch.exp(pre - top.transpose(0, 1).reshape(kv_heads, b * rep * q_len, 1))
    total = e_own.sum(-1) + e_pre.sum(-1).view(kv_heads, b, rep * q_len).transpose(0, 1)
    out = torch.matmul(e_own.to(value.dtype), value).float()  # [b, kv_heads, rep*q, dim]
    out = out + torch.matmul(e_pre.to(pv.dtype), pv[0]).float().view(kv_heads, b, rep * q_len, dim).transpose(0, 1)
    out = (out / total.unsqueeze(-1)).to(query.dtype)
    return out.reshape(b, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make `ATTENTION` a transformers attention implementation (with SDPA's boolean masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class _SlabLayer:
    """One layer's keys and values, [rows, heads, capacity, dim], filled up to `length` columns."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        self.keys: Any = None
        self.values: Any = None
        self.kbuf: Any = None
        self.vbuf: Any = None
        self.length = 0
        self.is_initialized = False

    def _alloc(self, like: Any, rows: int, capacity: int) -> tuple[Any, Any]:
        import torch

        # Uninitialized: the callers write or zero every column below `length` before attention reads it;
        # masked columns must hold finite values (a masked NaN still poisons its row: 0 x NaN = NaN).
        shape = (rows, like.shape[1], capacity, like.shape[3])
        return (
            torch.empty(shape, dtype=like.dtype, device=like.device),
            torch.empty(shape, dtype=like.dtype, device=like.device),
        )

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        n = key_states.shape[-2]
        if self.kbuf is None:
            self.kbuf, self.vbuf = self._alloc(key_states, key_states.shape[0], max(64, 2 * n))
            self.is_initialized = True
            self.dtype, self.device = key_states.dtype, key_states.device
        if self.length + n > self.kbuf.shape[-2]:
            self.reserve(self.length + n)
        self.kbuf[:, :, self.length : self.length + n] = key_states
        self.vbuf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]

    def reserve(self, columns: int) -> None:
        """Capacity for `columns`, doubling, so growth costs amortized O(1) per column."""
        if columns <= self.kbuf.shape[-2]:
            return
        capacity = max(columns, 2 * self.kbuf.shape[-2])
        k, v = self._alloc(self.kbuf, self.kbuf.shape[0], capacity)
        k[:, :, : self.length] = self.kbuf[:, :, : self.length]
        v[:, :, : self.length] = self.vbuf[:, :, : self.length]
        self.kbuf, self.vbuf = k, v
        self._views()

    def get_seq_length(self, *args: Any) -> int:
        return self.length

    def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
        q = query_length.shape[0] if hasattr(query_length, "shape") else int(query_length)
        return self.length + q, 0

    def get_max_cache_shape(self, *args: Any) -> int:
        return -1

    get_max_length = get_max_cache_shape


def _slab_cache(n_layers: int) -> Any:
    """A transformers `Cache` whose layers are slabs; the model code sees an ordinary dynamic cache."""
    from transformers.cache_utils import CacheLayerMixin, DynamicCache

    class SlabLayer(_SlabLayer, CacheLayerMixin):  # type: ignore[misc]
        def __init__(self) -> None:
            _SlabLayer.__init__(self)

        def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
            pass

    cache = DynamicCache()
    cache.layers = [SlabLayer() for _ in range(n_layers)]
    return cache


class _Batch:
    """The running rows: `slots` rows of one slab cache and one attention mask, all rows right-aligned at
    the shared write column `length`. A row that ends frees its slot; a joiner's prefilled keys and values
    are written into a free slot in place, so joining copies one row, not the batch."""

    def __init__(self, n_layers: int, slots: int, device: Any):
        self.cache = _slab_cache(n_layers)
        self.slots = slots
        self.rows: list[_Row | None] = []
        self.mask: Any = None
        self.device = device

    @property
    def length(self) -> int:
        return self.cache.layers[0].length

    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def free(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None] + list(range(len(self.rows), self.slots))

    def add(self, rows: list[tuple[int, _Row]], cache: Any, mask: Any) -> None:
        """Write freshly prefilled rows (their own cache of `mask.shape[1]` columns) into free slots."""
        import torch

        width = mask.shape[1]
        if self.mask is None:
            like = cache.layers[0].kbuf
            capacity = 2 * width + 64
            for layer in self.cache.layers:
                layer.kbuf, layer.vbuf = layer._alloc(like, self.slots, capacity)
                layer.kbuf[:, :, :width] = 0  # slots left free here are read (masked) until a row joins
                layer.vbuf[:, :, :width] = 0
                layer.length, layer.is_initialized = width, True
                layer.dtype, layer.device = like.dtype, like.device
                layer._views()
            self.mask = torch.zeros((self.slots, capacity), dtype=torch.long, device=self.device)
            self.rows = [None] * self.slots
        elif width > self.length:
            self._shift(width - self.length)
        length = self.length
        pad = length - width
        free = self.free()
        for (j, r), slot in zip(rows, free, strict=False):
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.kbuf[slot, :, :pad] = 0
                mine.vbuf[slot, :, :pad] = 0
                mine.kbuf[slot, :, pad:length] = theirs.kbuf[j, :, :width]
                mine.vbuf[slot, :, pad:length] = theirs.vbuf[j, :, :width]
            self.mask[slot, :pad] = 0
            self.mask[slot, pad:length] = mask[j]
            self.rows[slot] = r

    def _shift(self, n: int) -> None:
        """Move every row `n` columns to the right (n > 0) or left (n < 0), keeping capacity to spare."""
        import torch

        old = self.length
        new = old + n
        capacity = max(self.mask.shape[1], 2 * new + 64) if n > 0 else self.mask.shape[1]
        src = slice(max(0, -n), old)
        dst = slice(max(0, n), new)
        for layer in self.cache.layers:
            k, v = layer._alloc(layer.kbuf, self.slots, capacity)
            k[:, :, dst] = layer.kbuf[:, :, src]
            v[:, :, dst] = layer.vbuf[:, :, src]
            if n > 0:
                k[:, :, :n] = 0
                v[:, :, :n] = 0
            layer.kbuf, layer.vbuf, layer.length = k, v, new
            layer._views()
        mask = torch.zeros((self.slots, capacity), dtype=self.mask.dtype, device=self.device)
        mask[:, dst] = self.mask[:, src]
        self.mask = mask

    def attention_mask(self) -> Any:
        """The mask for the next step: every row's columns so far plus the column being written (free slots
        attend to their own column only, so no row is ever fully masked)."""
        length = self.length
        if length + 1 > self.mask.shape[1]:
            for layer in self.cache.layers:
                layer.reserve(2 * (length + 1))
            import torch

            grown = torch.zeros(
                (self.slots, self.cache.layers[0].kbuf.shape[-2]), dtype=self.mask.dtype, device=self.device
            )
            grown[:, :length] = self.mask[:, :length]
            self.mask = grown
        self.mask[:, length] = 1
        return self.mask[:, : length + 1]

    def release(self, slot: int) -> None:
        self.rows[slot] = None
        self.mask[slot, : self.length] = 0

    def compact(self) -> None:
        """Drop free slots (once nothing waits for them) and the columns no remaining row uses."""
        import torch

        keep = [i for i, r in enumerate(self.rows) if r is not None]
        if not keep:
            self.rows, self.mask = [], None
            self.cache = _slab_cache(len(self.cache.layers))
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        used = self.mask[idx, : self.length].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        for layer in self.cache.layers:
            layer.kbuf = layer.kbuf[idx, :, start:].contiguous()
            layer.vbuf = layer.vbuf[idx, :, start:].contiguous()
            layer.length -= start
            layer._views()
        self.mask = self.mask[idx, start:].contiguous()
        self.rows = [self.rows[i] for i in keep]
        self.slots = len(keep)

    def trim(self) -> None:
        """Drop leading columns no row uses any more, once they are half the slab: amortized, rare."""
        import torch

        active = [i for i, r in enumerate(self.rows) if r is not None]
        if not active:
            return
        idx = torch.tensor(active, dtype=torch.long, device=self.device)
        used = self.mask[idx, : self.length].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 64 and start > self.length // 2:
            self._shift(-start)


PREFILL_TOKENS = 4096
"""At most this many positions (own tokens and padding) in one prefill forward: bounds its memory."""
PREFILL_SLACK = 1.15
"""Joiners prefill together only while the longest is within this factor (+8) of the shortest: padding
is computed like real tokens, and prefill is where the compute goes."""


def _prefill_group(own_lengths: Sequence[int]) -> int:
    """How many of the next waiting requests (sorted by own length, ascending) prefill together."""
    n = 1
    while n < len(own_lengths):
        width = own_lengths[n]
        if width > PREFILL_SLACK * own_lengths[0] + 8 or (n + 1) * width > PREFILL_TOKENS:
            break
        n += 1
    return n


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all prompts share, leaving every prompt one token of its own."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


class ContinuousDecoder:
    """Decodes a list of tokenized requests through `slots` rows that refill as rows end."""

    def __init__(self, model: Any, tokenizer: Any, model_key: str, slots: int):
        self.model = model
        self.tokenizer = tokenizer
        self.model_key = model_key
        self.slots = max(1, slots)
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        self._base, self._head = _plain_head(model)
        # transformers 5.x renamed the decoder's `past_key_values` argument to `cache`
        forward = inspect.signature((self._base or model).forward).parameters
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        if model.config._attn_implementation != ATTENTION:
            raise ValueError(f"the continuous decoder needs a model loaded with attn_implementation={ATTENTION!r}")

    def _logits(self, ids: Any, mask: Any, positions: Any, cache: Any, prefix: list[tuple[Any, Any]] | None) -> Any:
        """One forward over `cache` (filling it) and the next-token logits at each row's last position. For
        the decoder families whose output layer is a plain bias-free projection, the projection is computed
        as W @ h^T: MKL runs that shape twice as fast as `linear`'s h @ W^T at a few rows (the output layer
        is a fifth of a decode step)."""
        import torch

        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_kw: cache,
            "use_cache": True,
            "shared_prefix": prefix,
        }
        if self._head is None:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        hidden = self._base(**inputs).last_hidden_state[:, -1, :]
        return torch.mm(self._head, hidden.t()).t().float()

    # ------------------------------------------------------------------ shared prefix

    def _prefix(self, prompts: list[list[int]], stats: DecodeStats) -> tuple[int, list[tuple[Any, Any]] | None]:
        """The longest stored prefix every prompt starts with, or this call's own common prefix (stored
        for the calls after it) when that is meaningfully longer."""
        n = common_prefix(prompts) if len(prompts) > 1 else 0
        shortest = min(len(p) for p in prompts) - 1
        best: tuple[int, list[tuple[Any, Any]] | None] = (0, None)
        with _PREFIX_LOCK:
            used = None
            for (key, tokens), kv in _PREFIXES.items():
                if key != self.model_key or len(tokens) > shortest or len(tokens) <= best[0]:
                    continue
                if all(tuple(p[: len(tokens)]) == tokens for p in prompts):
                    best, used = (len(tokens), kv), (key, tokens)
            if used is not None:
                _PREFIXES.move_to_end(used)
        if n >= MIN_SHARED_PREFIX and n > best[0] + MIN_SHARED_PREFIX // 2:
            tokens = tuple(prompts[0][:n])
            kv = self._compute_prefix(list(tokens))
            stats.prefilled_tokens += n
            with _PREFIX_LOCK:
                _PREFIXES[(self.model_key, tokens)] = kv
                while len(_PREFIXES) > PREFIX_STORE_SIZE:
                    _PREFIXES.popitem(last=False)
            return n, kv
        if best[1] is not None:
            stats.prefix_reused = True
        return best

    def _compute_prefix(self, tokens: list[int]) -> list[tuple[Any, Any]]:
        import torch

        ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
        cache = _slab_cache(self.n_layers)
        with torch.inference_mode():
            if self._base is not None:
                self._base(input_ids=ids, **{self._cache_kw: cache}, use_cache=True)
            else:
                self.model(input_ids=ids, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1)
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        requests: Sequence[GenerationRequest],
        prompts: list[list[int]],
        constraints: list[Constraint | None],
        on_done: Callable[[int, GenerationResult], None],
    ) -> DecodeStats:

        stats = DecodeStats(requests=len(requests), prompt_tokens=sum(len(p) for p in prompts))
        if not requests:
            return stats
        try:
            p_len, prefix = self._prefix(prompts, stats)
        except Exception:  # no shared prefix is slower, never wrong
            log.exception("computing the shared prompt prefix failed; prefilling whole prompts")
            p_len, prefix = 0, None
        stats.shared_prefix_tokens = p_len
        # shortest own part first: joiners of similar length prefill together with little padding
        waiting = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        batch = _Batch(self.n_layers, self.slots, self.model.device)

        def finish(r: _Row) -> None:
            stats.output_tokens += len(r.generated)
            on_done(r.index, self._result(r))

        def fail(rows: Sequence[_Row], exc: Exception) -> None:
            for r in rows:
                on_done(r.index, GenerationResult("", error=f"{type(exc).__name__}: {exc}"))

        while waiting or batch.active():
            free = batch.free() if batch.mask is not None else list(range(self.slots))
            if free and waiting:
                n = _prefill_group([len(prompts[i]) - p_len for i in waiting[: len(free)]])
                take, waiting = waiting[:n], waiting[n:]
                rows = [self._row(i, requests[i], prompts[i], constraints[i]) for i in take]
                try:
                    logits, cache, mask = self._prefill(rows, p_len, prefix, stats)
                    for r, row_logits in zip(rows, logits, strict=True):
                        self._choose(r, row_logits)
                    alive = [(j, r) for j, r in enumerate(rows) if not r.done]
                    if alive:
                        batch.add(alive, cache, mask)
                except Exception as exc:  # one failed prefill must not lose the other requests
                    log.exception("prefill failed for %d request(s)", len(rows))
                    batch.rows = [None if any(br is r for r in rows) else br for br in batch.rows]
                    fail(rows, exc)
                    continue
                for r in rows:
                    if r.done:
                        finish(r)
                continue
            if not waiting and len(batch.free()) >= max(1, batch.slots // 4):
                batch.compact()  # the queue is empty: stop computing rows for free slots
            try:
                self._step(batch, prefix, stats)
            except Exception as exc:  # the rows in flight fail; the ones still waiting go on
                log.exception("decode step failed for %d request(s)", batch.active())
                fail([r for r in batch.rows if r is not None], exc)
                batch = _Batch(self.n_layers, self.slots, self.model.device)
                continue
            for slot, r in enumerate(batch.rows):
                if r is not None and r.done:
                    finish(r)
                    batch.release(slot)
            batch.trim()
        return stats

    def _row(self, index: int, request: GenerationRequest, prompt: list[int], c: Constraint | None) -> _Row:
        import torch

        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(int(request.seed))
        return _Row(index, request, prompt, c, generator, position=len(prompt))

    def _prefill(
        self, rows: list[_Row], p_len: int, prefix: list[tuple[Any, Any]] | None, stats: DecodeStats
    ) -> tuple[Any, Any, Any]:
        """Prefill the rows' own tokens after the shared prefix: [prefix][pads][own tokens]."""
        import torch

        started = time.perf_counter()
        own = [r.prompt[p_len:] for r in rows]
        width = max(len(o) for o in own)
        k, device = len(rows), self.model.device
        ids = torch.full((k, width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((k, width), dtype=torch.long, device=device)
        positions = torch.full((k, width), p_len, dtype=torch.long, device=device)
        for j, o in enumerate(own):
            pad = width - len(o)
            ids[j, pad:] = torch.tensor(o, dtype=torch.long, device=device)
            mask[j, pad:] = 1
            positions[j, pad:] = torch.arange(p_len, p_len + len(o), device=device)
        cache = _slab_cache(self.n_layers)
        with torch.inference_mode():
            logits = self._logits(ids, mask, positions, cache, prefix)
        stats.prefilled_tokens += sum(len(o) for o in own)
        stats.padded_tokens += k * width - sum(len(o) for o in own)
        stats.prefill_seconds += time.perf_counter() - started
        return logits, cache, mask

    def _step(self, batch: _Batch, prefix: list[tuple[Any, Any]] | None, stats: DecodeStats) -> None:
        import torch

        started = time.perf_counter()
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[r.generated[-1] if r else pad] for r in batch.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[r.position if r else 0] for r in batch.rows], dtype=torch.long, device=device)
        mask = batch.attention_mask()
        with torch.inference_mode():
            logits = self._logits(ids, mask, positions, batch.cache, prefix)
        for r, row_logits in zip(batch.rows, logits, strict=True):
            if r is not None:
                r.position += 1
                self._choose(r, row_logits)
        stats.decode_steps += 1
        stats.decode_seconds += time.perf_counter() - started

    def _choose(self, r: _Row, scores: Any) -> None:
        """The next token of one row, with its constraint applied exactly as the logits processor of the
        `generate` path applies it; marks the row done at end of text, a stop string or its token budget."""
        import torch

        req, step, c = r.request, len(r.generated), r.constraint
        if c is not None:
            if step > 0:
                c.advance(r.generated[-1])
            if req.max_new_tokens - step <= c.reserve():
                c.force_finish()
            allowed = c.allowed()
            if allowed is not None:
                keep = torch.full_like(scores, float("-inf"))
                idx = torch.tensor(sorted(set(allowed)), dtype=torch.long, device=scores.device)
                keep[idx] = scores[idx]
                scores = keep
            else:
                banned = c.banned()
                if banned:
                    scores = scores.clone()
                    scores[banned] = float("-inf")
        if req.temperature > 0:
            token = _sample(scores, req.temperature, 0.95, 50, r.generator)
        else:
            token = int(torch.argmax(scores))
        r.generated.append(token)
        if token in self.stop_ids or len(r.generated) >= req.max_new_tokens:
            r.done = True
        elif req.stop:
            r.done = self._hits_stop(r)

    def _hits_stop(self, r: _Row) -> bool:
        """A stop string ends inside the generated text; like `generate`'s stop-string check, the prompt's
        last tokens count as the text before it (a prompt ending in "\n" stops at a first "\n" for "\n\n")."""
        if len(r.generated) <= STOP_WINDOW:
            before = self.tokenizer.decode(r.prompt[-4:])
            text = before + self.tokenizer.decode(r.generated, skip_special_tokens=True)
        else:
            before, text = "", self.tokenizer.decode(r.generated[-STOP_WINDOW:], skip_special_tokens=True)
        return any(text.find(s, max(0, len(before) - len(s) + 1)) != -1 for s in r.request.stop)

    def _result(self, r: _Row) -> GenerationResult:
        gen = r.generated
        n = 0
        while n < len(gen) and gen[n] not in self.stop_ids:
            n += 1
        text = cut_at_stop(self.tokenizer.decode(gen[:n], skip_special_tokens=True), r.request.stop)
        return GenerationResult(
            text=r.request.assistant_prefix + text, prompt_tokens=len(r.prompt), completion_tokens=len(gen)
        )


_GENERATION_EXTRAS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "min_new_tokens",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
)


def unsupported_reason(config: Any, generation_config: Any) -> str | None:
    """Why this model cannot take the continuous path (so the backend uses `generate`), or None: its
    attention must be the plain causal kind `shared_prefix_attention` implements, and its generation
    config must not ask `generate` for processors this loop does not apply (the paths must agree)."""
    kind = getattr(config, "model_type", None)
    if kind not in _PLAIN_HEAD_FAMILIES:
        return f"model type {kind!r} is not one the continuous path is checked on ({sorted(_PLAIN_HEAD_FAMILIES)})"
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        return "the model uses sliding-window attention"
    if kind == "mistral" and getattr(config, "sliding_window", None):
        return "the model uses sliding-window attention"
    neutral = {"repetition_penalty": 1.0}
    for name in _GENERATION_EXTRAS:
        value = getattr(generation_config, name, None)
        if value not in (None, 0, [], neutral.get(name)):
            return f"its generation config sets {name}={value!r}"
    return None


_PLAIN_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}


def _plain_head(model: Any) -> tuple[Any, Any]:
    """(decoder, output weight) for a model whose logits are exactly `decoder(...) @ W^T`, else (None, None)."""
    import torch

    cfg = model.config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if (
        getattr(cfg, "model_type", None) not in _PLAIN_HEAD_FAMILIES
        or not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or base is None
        or getattr(cfg, "final_logit_softcapping", None)
    ):
        return None, None
    return base, head.weight


def _sample(scores: Any, temperature: float, top_p: float, top_k: int, generator: Any) -> int:
    """Temperature, top-k (generate's default 50), then nucleus sampling, from the row's own generator."""
    import torch

    logits = scores / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[-1] = False
    logits = logits.clone()
    logits[order[remove]] = float("-inf")
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
