"""Training checkpoints hold tensors and plain types only, load with weights_only=True, and resume exactly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fineinstructions_core.training import Checkpoint, TrainReport, optimize


class _RunsCodeWhenUnpickled:
    """What a tampered checkpoint could carry: unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _train(out: Path, total: int, time_budget_s: float | None) -> tuple[torch.nn.Module, TrainReport, bool]:
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    report = TrainReport()

    def batch_loss(idx):
        idx = torch.as_tensor(np.asarray(idx))
        return torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])

    def eval_loss():
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x).squeeze(-1), y))

    finished = optimize(
        model,
        optimizer,
        Checkpoint(out, "fp-1"),
        report,
        batch_loss,
        eval_loss,
        np.arange(12),
        total=total,
        batch_size=4,
        lr=0.05,
        warmup=1,
        seed=0,
        checkpoint_every=0,
        time_budget_s=time_budget_s,
        started=time.perf_counter(),
        label="test",
        logger=lambda _: None,
    )
    return model, report, finished


def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path):
    whole, whole_report, finished = _train(tmp_path / "a", total=6, time_budget_s=None)
    assert finished
    _, stopped, finished = _train(tmp_path / "b", total=6, time_budget_s=0)  # stops after one step
    assert not finished and stopped.steps == 1 and (tmp_path / "b" / "checkpoint.pt").exists()
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)  # tensors and plain types only
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["step"] == 1
    resumed, report, finished = _train(tmp_path / "b", total=6, time_budget_s=None)
    assert finished and report.resumed_from_step == 1
    assert report.losses == whole_report.losses  # same batches, optimizer state and dropout masks
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    marker = tmp_path / "code-ran"
    ckpt = Checkpoint(tmp_path, "fp-1")
    torch.save({"fingerprint": "fp-1", "step": 3, "payload": _RunsCodeWhenUnpickled(marker)}, ckpt.path)
    assert ckpt.load() is None  # refused, training starts over
    assert not marker.exists()
    ckpt.path.write_bytes(b"not a checkpoint at all")
    assert ckpt.load() is None
