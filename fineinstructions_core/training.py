"""Fine-tuning students: a causal LM on (prompt, target) pairs, and the matching embedder on labelled
(text, document) pairs with a cosine-similarity loss. Plain PyTorch loops, seeded and resumable.

Both write the finished model as a normal Hugging Face directory into `out_dir/model` (written to a
temporary folder and renamed into place, so a half-written model is never picked up), and keep a
checkpoint (`out_dir/checkpoint.pt`: weights, optimizer, step, losses, and a fingerprint of data and
settings) every `checkpoint_every` steps, and when `time_budget_s` runs out (the report then says
`finished: False` and no model is written). A rerun with the same fingerprint resumes from it; a
different fingerprint starts over. The checkpoint is deleted once the model is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .embed import gaussian_weights
from .io.files import replace_dir

log = logging.getLogger(__name__)
Logger = Callable[[str], None]


@dataclass
class TrainReport:
    steps: int = 0
    epochs: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    skipped_too_long: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int = 0
    finished: bool = True
    model_dir: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _split(n: int, eval_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_eval = min(n - 1, max(1, round(n * eval_share))) if eval_share > 0 and n > 1 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def save_model_dir(model: Any, tokenizer: Any, target: Path, extra_files: Sequence[Path] = ()) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".save-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in extra_files:
            if f.exists():
                shutil.copy(f, tmp / f.name)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class Checkpoint:
    """Training state between runs, as tensors and plain types only: it is read back with
    `torch.load(weights_only=True)`, which never runs code from a file in the data directory. RNG
    states are saved as the tensors torch gives them."""

    def __init__(self, out_dir: Path, fingerprint: str):
        self.path = out_dir / "checkpoint.pt"
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        import pickle

        import torch

        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            # Not a checkpoint this code wrote (or a damaged one): start over rather than trust it.
            log.warning("ignoring the checkpoint %s, which cannot be read safely: %s", self.path, exc)
            return None
        return state if isinstance(state, dict) and state.get("fingerprint") == self.fingerprint else None

    def save(self, model: Any, optimizer: Any, step: int, report: TrainReport) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(
            {
                "fingerprint": self.fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "report": report.as_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            },
            tmp,
        )
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _restore_rng(state: dict[str, Any]) -> None:
    import torch

    rng = state.get("rng") or {}
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def heldout_mean_loss(model: Any, batch_loss: Callable[[Any], Any], rows: Sequence[Any], batch_size: int) -> float:
    """The mean of `batch_loss` over `rows` in batches, weighted by batch size, in eval mode and without
    gradients (NaN without rows)."""
    import torch

    if not len(rows):
        return float("nan")
    model.eval()
    with torch.no_grad():
        total = sum(
            float(batch_loss(rows[b : b + batch_size])) * len(rows[b : b + batch_size])
            for b in range(0, len(rows), batch_size)
        )
    model.train()
    return total / len(rows)


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def optimize(
    model: Any,
    optimizer: Any,
    ckpt: Checkpoint,
    report: TrainReport,
    batch_loss: Callable[[Sequence[int]], Any],
    eval_loss: Callable[[], float],
    train_idx: np.ndarray,
    *,
    total: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    checkpoint_every: int,
    time_budget_s: float | None,
    started: float,
    label: str,
    logger: Logger,
    eval_every: int | None = None,
) -> bool:
    """The training loop every trainer shares: resume, seeded epoch order, linear warmup and decay,
    clipping, held-out loss per epoch (and every `eval_every` steps), checkpoints. False when the time
    budget stopped it early."""
    import torch

    step = 0
    state = ckpt.load()
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state)
        step = report.resumed_from_step = int(state["step"])
        report.losses = [tuple(x) for x in state["report"]["losses"]]
        report.eval_losses = [tuple(x) for x in state["report"]["eval_losses"]]
        logger(f"resuming from the checkpoint at step {step}/{total}")
    if step == 0:
        report.eval_losses.append((0, round(eval_loss(), 4)))
    model.train()
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    last_log = time.perf_counter()
    while step < total:
        order = np.random.default_rng(seed + step // steps_per_epoch).permutation(train_idx)
        b = step % steps_per_epoch
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(step, total, lr, warmup)
        loss = batch_loss(order[b * batch_size : (b + 1) * batch_size])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        report.steps = step
        report.losses.append((step, round(loss.item(), 4)))
        if step % steps_per_epoch == 0 or step == total or (eval_every and step % eval_every == 0):
            report.eval_losses.append((step, round(eval_loss(), 4)))
        if checkpoint_every and step % checkpoint_every == 0 and step < total:
            ckpt.save(model, optimizer, step, report)
        if time_budget_s is not None and time.perf_counter() - started >= time_budget_s and step < total:
            ckpt.save(model, optimizer, step, report)
            logger(f"time budget of {time_budget_s:.0f}s spent at step {step}/{total}; rerun to resume")
            report.finished = False
            report.seconds = round(time.perf_counter() - started, 1)
            return False
        if time.perf_counter() - last_log >= 15 or step == total:
            last_log = time.perf_counter()
            eta = (time.perf_counter() - started) / max(1, step - report.resumed_from_step) * (total - step)
            logger(f"{label} step {step}/{total}, loss {loss.item():.4f}, ETA {eta:.0f}s")
    return True


# ------------------------------------------------------------------------------------ causal LM (SFT)


def train_causal_lm(
    base_dir: Path,
    examples: Sequence[tuple[list[dict[str, str]], str]],
    out_dir: Path,
    *,
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 8,
    max_tokens: int = 512,
    eval_share: float = 0.1,
    seed: int = 0,
    checkpoint_every: int = 50,
    max_steps: int | None = None,
    time_budget_s: float | None = None,
    logger: Logger = log.info,
) -> TrainReport:
    """Full fine-tuning on (chat messages, target) pairs; the loss is on the target tokens only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = eos if isinstance(eos, int) and eos != tokenizer.unk_token_id else tokenizer.eos_token_id
    encoded: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for messages, target in examples:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        t_ids = tokenizer(target, add_special_tokens=False).input_ids + [eos]
        if len(p_ids) + len(t_ids) > max_tokens:
            skipped += 1
            continue
        encoded.append((p_ids, t_ids))
    if len(encoded) < 2:
        raise ValueError(f"need at least 2 training examples within {max_tokens} tokens, have {len(encoded)}")
    train_idx, eval_idx = _split(len(encoded), eval_share, seed)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    report = TrainReport(
        epochs=epochs, train_examples=len(train_idx), eval_examples=len(eval_idx), skipped_too_long=skipped
    )
    ckpt = Checkpoint(
        out_dir, data_fingerprint(str(base_dir), encoded, epochs, lr, batch_size, max_tokens, eval_share, seed, total)
    )

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def batch_tensors(idx: Sequence[int]) -> tuple[Any, Any, Any]:
        rows = [encoded[i] for i in idx]
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (p, t) in enumerate(rows):
            seq = p + t
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, len(p) : len(seq)] = torch.tensor(t)
            mask[r, : len(seq)] = 1
        return ids, labels, mask

    def eval_loss() -> float:
        if not len(eval_idx):
            return float("nan")
        model.eval()
        total_loss, total_tokens = 0.0, 0
        with torch.no_grad():
            for b in range(0, len(eval_idx), batch_size):
                ids, labels, mask = batch_tensors(eval_idx[b : b + batch_size])
                n = int((labels[:, 1:] != -100).sum())
                total_loss += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
                total_tokens += n
        model.train()
        return total_loss / max(1, total_tokens)

    def batch_loss(idx: Sequence[int]) -> Any:
        ids, labels, mask = batch_tensors(idx)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    finished = optimize(
        model,
        optimizer,
        ckpt,
        report,
        batch_loss,
        eval_loss,
        train_idx,
        total=total,
        batch_size=batch_size,
        lr=lr,
        warmup=max(1, total // 20),
        seed=seed,
        checkpoint_every=checkpoint_every,
        time_budget_s=time_budget_s,
        started=started,
        label="train",
        logger=logger,
    )
    if not finished:
        return report
    model.config.use_cache = True
    save_model_dir(model, tokenizer, out_dir / "model")
    ckpt.remove()
    report.seconds = round(time.perf_counter() - started, 1)
    report.model_dir = str(out_dir / "model")
    return report


# ------------------------------------------------------------------------------------ embedder


def train_embedder(
    base_dir: Path,
    pairs: Sequence[tuple[str, str, float]],
    out_dir: Path,
    *,
    epochs: int = 1,
    lr: float = 2e-5,
    batch_size: int = 16,
    max_tokens: int = 256,
    eval_share: float = 0.1,
    seed: int = 0,
    checkpoint_every: int = 100,
    chunk: tuple[int, float, float] | None = None,
    chunk_of: Sequence[int | None] | None = None,
    max_steps: int | None = None,
    time_budget_s: float | None = None,
    logger: Logger = log.info,
) -> TrainReport:
    """Cosine-similarity loss, (cos(query, document) - label)^2, as sentence-transformers'
    CosineSimilarityLoss. The query side is mean-pooled (as template descriptions are embedded).

    Round one: the document side is its masked mean (the global vector). Round two (`chunk=(K, sigma, min_width)`
    and `chunk_of[i]` = the labelled chunk k in 1..K): the loss is taken on that chunk's Gaussian local
    vector, the paper's second fine-tuning round.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModel.from_pretrained(base_dir)
    train_idx, eval_idx = _split(len(pairs), eval_share, seed)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    report = TrainReport(epochs=epochs, train_examples=len(train_idx), eval_examples=len(eval_idx))
    ckpt = Checkpoint(
        out_dir,
        data_fingerprint(
            str(base_dir), pairs, epochs, lr, batch_size, max_tokens, eval_share, seed, chunk, chunk_of, total
        ),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def pooled(texts: list[str], chunks: list[int | None] | None) -> Any:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        if not chunks or chunk is None:
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        K, sigma, min_width = chunk
        rows = []
        for r, k in enumerate(chunks):
            T = int(enc["attention_mask"][r].sum())
            if k is None:
                w = mask[r, :, 0] / mask[r, :, 0].sum()
            else:
                w = torch.zeros(hidden.shape[1])
                w[:T] = torch.from_numpy(gaussian_weights(T, K, sigma, min_width)[k - 1]).float()
            rows.append((hidden[r] * w.unsqueeze(-1)).sum(0))
        return torch.stack(rows)

    def batch_loss(idx: Sequence[int]) -> Any:
        q = pooled([pairs[i][0] for i in idx], None)
        d = pooled([pairs[i][1] for i in idx], [chunk_of[i] for i in idx] if chunk_of is not None else None)
        labels = torch.tensor([float(pairs[i][2]) for i in idx])
        return torch.nn.functional.mse_loss(torch.nn.functional.cosine_similarity(q, d), labels)

    def eval_loss() -> float:
        return heldout_mean_loss(model, batch_loss, eval_idx, batch_size)

    finished = optimize(
        model,
        optimizer,
        ckpt,
        report,
        batch_loss,
        eval_loss,
        train_idx,
        total=total,
        batch_size=batch_size,
        lr=lr,
        warmup=max(1, total // 10),
        seed=seed,
        checkpoint_every=checkpoint_every,
        time_budget_s=time_budget_s,
        started=started,
        label="embedding",
        logger=logger,
    )
    if not finished:
        return report
    extra = [base_dir / n for n in ("sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")]
    save_model_dir(model, tokenizer, out_dir / "model", extra)
    ckpt.remove()
    report.seconds = round(time.perf_counter() - started, 1)
    report.model_dir = str(out_dir / "model")
    return report


# ------------------------------------------------------------------------------------ plots


def loss_curve_svg(series: dict[str, Sequence[tuple[int, float]]], width: int = 480, height: int = 200) -> str:
    """A dependency-free SVG line chart of loss against step, one polyline per series."""
    pts = [(s, v) for values in series.values() for s, v in values if v == v]  # drop NaN
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    pad = 36
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]

    def xy(s: float, v: float) -> str:
        x = pad + (s - x0) / (x1 - x0) * (width - 2 * pad)
        y = height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="10">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
        f'<text x="{pad}" y="{height - pad + 14}">{x0}</text>',
        f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="end">step {x1}</text>',
        f'<text x="2" y="{pad}">{y1:.3g}</text>',
        f'<text x="2" y="{height - pad}">{y0:.3g}</text>',
    ]
    for n, (name, values) in enumerate(series.items()):
        good = [(s, v) for s, v in values if v == v]
        color = colors[n % len(colors)]
        if len(good) > 1:
            points = " ".join(xy(s, v) for s, v in good)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
        for s, v in good if len(good) <= 20 else []:
            cx, cy = xy(s, v).split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
        parts.append(f'<text x="{width - pad - 90}" y="{pad + 12 * n}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)
