"""Shared by the benchmarks that check two ways of training on the same global batch give the same losses
(`ddp_cpu.py`, `grad_accumulation.py`, `precision_cpu.py`): randomness keyed by sample, a loss recorder and an
optimizer-step timer.

The training loader already gives the same global batches however they are split: its `DistributedSampler`
order is the run seed's in 1 or N processes (rank r's batch t holds samples r, r + N, ... of batch t of one
process with N times the batch size), and micro-batches are consecutive slices of it.

A diffusion loss draws noise and timesteps from the global RNG, so the same sample gets other noise when it
sits in another process or another micro-batch. `keyed_noise` draws them per sample from a generator seeded by
(sample key, optimizer step) instead; with caption dropout off (`model.caption_dropout=0`) the loss of a
global batch is then a function of the weights and the samples only, however the batch is split.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch

from text2img.lightning import Text2ImgModule
from text2img.types import Batch


@contextmanager
def keyed_noise(keys: torch.Tensor, step: int) -> Iterator[None]:
    """`torch.randn_like` and `torch.randint` (what `DiffusionGenerator.training_loss` draws) per sample."""
    generators = [torch.Generator().manual_seed(int(key) * 1_000_003 + step) for key in keys]
    randn_like, randint = torch.randn_like, torch.randint

    def keyed_randn_like(x: torch.Tensor, **kwargs) -> torch.Tensor:
        assert len(x) == len(generators), "noise for another batch than the keys'"
        rows = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generators]
        return torch.stack(rows).to(x.device)

    def keyed_randint(low: int, high: int, size: tuple[int, ...], **kwargs) -> torch.Tensor:
        assert tuple(size) == (len(generators),), "timesteps for another batch than the keys'"
        return torch.cat([randint(low, high, (1,), generator=g) for g in generators]).to(kwargs.get("device"))

    torch.randn_like, torch.randint = keyed_randn_like, keyed_randint
    try:
        yield
    finally:
        torch.randn_like, torch.randint = randn_like, randint


def record_losses(module: Text2ImgModule) -> list[tuple[int, float]]:
    """Run the module's training step under `keyed_noise`; returns the list it appends (step, loss) to."""
    losses: list[tuple[int, float]] = []
    step = module.training_step

    def keyed_step(batch: Batch, batch_idx: int) -> torch.Tensor:
        with keyed_noise(batch.keys, module.trainer.global_step):
            loss = step(batch, batch_idx)
        losses.append((module.trainer.global_step, float(loss.detach())))
        return loss

    module.training_step = keyed_step
    return losses


def mean_loss_per_step(losses: list[tuple[int, float]]) -> dict[int, float]:
    """The loss of each optimizer step: the mean over its micro-batches (and processes, when concatenated)."""
    by_step: dict[int, list[float]] = {}
    for step, loss in losses:
        by_step.setdefault(step, []).append(loss)
    return {step: sum(values) / len(values) for step, values in by_step.items()}


class OptimizerStepTimer(L.Callback):
    """Wall time between consecutive optimizer steps (all micro-batches and the batch fetches included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: tuple[int, float] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.global_step == self._last[0]:
            return  # still accumulating
        if self._last is not None:
            self.times.append(now - self._last[1])
        self._last = (trainer.global_step, now)


def side_by_side(
    batch: int, times: dict[str, list[float]], losses: dict[str, dict[int, float]], reference: str, other: str
) -> dict:
    """What every two-variant bench reports: each variant's images/s (median step), their ratio, and how far
    apart their loss curves are (per optimizer step, the same global batch)."""
    speed = {name: batch / statistics.median(step_times) for name, step_times in times.items()}
    steps = sorted(losses[reference])
    difference = [abs(losses[reference][step] - losses[other][step]) for step in steps]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "global_batch": batch,
        f"{reference}_images_per_s": round(speed[reference], 1),
        f"{other}_images_per_s": round(speed[other], 1),
        f"{other}_over_{reference}": round(speed[other] / speed[reference], 3),
        "steps_compared": len(steps),
        "max_abs_loss_difference": float(f"{max(difference):.3g}"),
        "loss_first_last": [round(losses[reference][steps[0]], 4), round(losses[reference][steps[-1]], 4)],
    }


def timed_fit(model: Text2ImgModule, datamodule: L.LightningDataModule, steps: int, **trainer_options) -> tuple[
    list[float], dict[int, float]
]:
    """Optimizer-step times and per-step mean losses of `steps` steps on one CPU process (no logger,
    checkpoints or validation); `trainer_options` are the variant's (precision, accumulate_grad_batches...)."""
    losses = record_losses(model)
    timer = OptimizerStepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=[timer], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **trainer_options,
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.times, mean_loss_per_step(losses)
