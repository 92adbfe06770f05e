"""Exponential moving average of the weights, with a decay that warms up."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from text2img.errors import ConfigError


def warmup_decay(num_averaged: int, decay: float) -> float:
    """(1 + n) / (10 + n), capped at `decay`.

    A fixed decay keeps early weights for too long: with 0.999, a 1,200-step run still holds 30% of
    its step-1 weights, which shows up as noise in every sample.
    """
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def warmup_ema_(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor, decay: float) -> None:
    """In-place EMA step over all tensors at once (one fused op instead of one per tensor)."""
    torch._foreach_lerp_(averaged, current, 1.0 - warmup_decay(int(num_averaged), decay))


class EMA(WeightAveraging):
    """Lightning's `WeightAveraging` with a warmed-up EMA: validation, test and the checkpoint's
    `state_dict` use the averaged weights; the raw weights are kept for resuming."""

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, use_buffers: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must be in (0, 1), e.g. 0.999")
        super().__init__(use_buffers=use_buffers, multi_avg_fn=self._average)
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self._frozen: set[int] = set()

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):  # each rank holds a shard: there is no whole copy to average
            raise ConfigError("callbacks.ema cannot average FSDP-sharded weights; with trainer=fsdp drop it: '~callbacks.ema'")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        # Frozen weights (a LoRA-tuned LLM's base: 135M with SmolLM2) never change, so their average is their
        # first copy; skipping them saves a full pass over them every step. Read once the model is on its device.
        self._frozen = {p.data_ptr() for p in pl_module.parameters() if not p.requires_grad}

    def _average(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        """Called per dtype group: integer tensors (BERT's position ids, step counters) are copied, not averaged."""
        pairs = [(a, c) for a, c in zip(averaged, current) if c.data_ptr() not in self._frozen]
        if not pairs:
            return
        averaged, current = map(list, zip(*pairs))
        if averaged[0].is_floating_point():
            warmup_ema_(averaged, current, num_averaged, self.decay)
        else:
            torch._foreach_copy_(averaged, current)
