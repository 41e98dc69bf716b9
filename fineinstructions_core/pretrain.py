"""Continued pre-training on packed text: the paper's controlled comparison, at laptop scale.

Texts are tokenized, separated by EOS, concatenated in a seeded order and cut into blocks of
`sequence_length` tokens; the loss is on every token. `token_budget` fixes how many tokens a model sees:
the stream repeats (reshuffled) until it is reached, so a model trained on instruction pairs and one
trained on raw documents see exactly the same number of tokens, whatever their data's own size.
The loop is the students' (`training.optimize`): seeded, checkpointed, resumable, time-bounded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .training import Checkpoint, TrainReport, data_fingerprint, heldout_mean_loss, optimize, save_model_dir

log = logging.getLogger(__name__)
MIN_TOKENS = 16
Logger = Callable[[str], None]


@dataclass
class PackedData:
    """Training blocks (each exactly `sequence_length` tokens) and held-out blocks."""

    train: list[list[int]]
    heldout: list[list[int]]
    data_tokens: int  # the training texts' own tokens (with EOS), before any repetition
    passes: float  # how many times the budget goes over the training texts
    sequence_length: int  # the block length used: the configured one, or the whole budget when shorter

    @property
    def tokens(self) -> int:
        return sum(len(b) for b in self.train)


def _stream(encoded: Sequence[list[int]], eos: int, seed: int, n_tokens: int) -> list[int]:
    """`n_tokens` of the texts, each followed by EOS, in a seeded order that is redrawn on each pass."""
    out: list[int] = []
    total = sum(len(t) + 1 for t in encoded)
    if not total:
        return out
    rnd = np.random.default_rng(seed)
    while len(out) < n_tokens:
        for i in rnd.permutation(len(encoded)):
            out.extend(encoded[i])
            out.append(eos)
            if len(out) >= n_tokens:
                break
    return out[:n_tokens]


def pack(
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    tokenizer: Any,
    *,
    sequence_length: int,
    token_budget: int | None,
    seed: int,
    max_heldout_blocks: int = 64,
) -> PackedData:
    """Blocks of `sequence_length` tokens: `token_budget` tokens (rounded down to whole blocks) of the
    training texts, default all of them once; the held-out texts once, at most `max_heldout_blocks`
    blocks (of the same length; a shorter remainder only when it is all there is)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model's tokenizer has no EOS token to separate packed texts")

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [tokenizer(t, add_special_tokens=False, verbose=False).input_ids for t in texts if t]

    train_enc, held_enc = encode(train_texts), encode(heldout_texts)
    data_tokens = sum(len(t) + 1 for t in train_enc)
    budget = data_tokens if token_budget is None else token_budget
    if budget < MIN_TOKENS or not data_tokens:
        raise ValueError(
            f"not enough text to train on: {data_tokens} tokens of training text and a budget of {budget} "
            f"tokens (at least {MIN_TOKENS} are needed)"
        )
    # A corpus smaller than one block (a demo's few pairs) trains on one block of its whole budget.
    sequence_length = min(sequence_length, budget)
    n_blocks = budget // sequence_length
    stream = _stream(train_enc, eos, seed, n_blocks * sequence_length)
    train = [stream[i : i + sequence_length] for i in range(0, len(stream), sequence_length)]
    held_stream = _stream(held_enc, eos, seed, sum(len(t) + 1 for t in held_enc))  # once each
    heldout = [held_stream[i : i + sequence_length] for i in range(0, len(held_stream), sequence_length)]
    heldout = [b for b in heldout if len(b) == sequence_length][:max_heldout_blocks] or heldout[:1]
    passes = round(n_blocks * sequence_length / data_tokens, 3)
    return PackedData(train, heldout, data_tokens, passes, sequence_length)


def pick_device(setting: str) -> str:
    """`auto` takes the GPU when there is one."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pretraining.device is cuda but torch sees no GPU")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def pretrain_causal_lm(
    base_dir: Path,
    data: PackedData,
    out_dir: Path,
    *,
    tokenizer: Any,
    batch_size: int,
    lr: float,
    seed: int,
    checkpoint_every: int,
    time_budget_s: float | None,
    device: str = "cpu",
    logger: Logger = log.info,
) -> TrainReport:
    """One pass over the packed blocks (seeded order), loss on every token; the model is saved to
    `out_dir/model` as a Hugging Face directory. Resumes from `out_dir/checkpoint.pt` when the data and
    settings are the same."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    torch.manual_seed(seed)
    blocks = torch.tensor(data.train, dtype=torch.long)
    held = torch.tensor(data.heldout, dtype=torch.long) if data.heldout else None
    total = math.ceil(len(blocks) / batch_size)
    report = TrainReport(epochs=1, train_examples=len(blocks), eval_examples=0 if held is None else len(held))
    ckpt = Checkpoint(out_dir, data_fingerprint(str(base_dir), data.train, data.heldout, batch_size, lr, seed, total))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def loss_of(ids: Any) -> Any:
        ids = ids.to(device)
        return model(input_ids=ids, labels=ids).loss

    def batch_loss(idx: Sequence[int]) -> Any:
        return loss_of(blocks[torch.as_tensor(np.asarray(idx))])

    def eval_loss() -> float:
        return float("nan") if held is None else heldout_mean_loss(model, loss_of, held, batch_size)

    finished = optimize(
        model,
        optimizer,
        ckpt,
        report,
        batch_loss,
        eval_loss,
        np.arange(len(blocks)),
        total=total,
        batch_size=batch_size,
        lr=lr,
        warmup=max(1, total // 20),
        seed=seed,
        checkpoint_every=checkpoint_every,
        time_budget_s=time_budget_s,
        started=started,
        label="pretrain",
        logger=logger,
        eval_every=max(1, total // 8),
    )
    if not finished:
        return report
    model.config.use_cache = True
    save_model_dir(model.to("cpu"), tokenizer, out_dir / "model")
    ckpt.remove()
    report.seconds = round(time.perf_counter() - started, 1)
    report.model_dir = str(out_dir / "model")
    return report
