"""Exponential moving average of the weights, with a decay that warms up."""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from text2img.errors import ConfigError


def warmup_decay(num_averaged: int, decay: float) -> float:
    """(1 + n) / (10 + n), capped at `decay`.

    A fixed decay keeps early weights for too long: with 0.999, a 1,200-step run still holds 30% of
    its step-1 weights, which shows up as noise in every sample.
    """
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def warmup_ema_(averaged: list[Tensor], current: list[Tensor], num_averaged: int, decay: float) -> None:
    """In-place EMA step over all tensors at once (one fused op instead of one per tensor)."""
    torch._foreach_lerp_(averaged, current, 1.0 - warmup_decay(int(num_averaged), decay))


class HostCountedAveragedModel(AveragedModel):
    """torch's `AveragedModel` with the number of updates also counted on the host: torch's own `update_parameters`
    reads its `n_averaged` buffer, on the GPU, twice per update (`n_averaged == 0`, `> 0`) and hands the averaging
    function a tensor, three host syncs per training step. The buffer is still kept (checkpoints), and read once
    after a load. The same update otherwise (a `multi_avg_fn`, which `EMA` always gives, gets the count as an int)."""

    _host_count: int | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_count = None

    def update_parameters(self, model: nn.Module) -> None:
        if self._host_count is None:
            self._host_count = int(self.n_averaged)  # one host read after setup or a load
        averaged = itertools.chain(self.module.parameters(), self.module.buffers()) if self.use_buffers else self.parameters()
        current = itertools.chain(model.parameters(), model.buffers()) if self.use_buffers else model.parameters()
        pairs = [(a.detach(), c.detach().to(a.device)) for a, c in zip(averaged, current)]
        if self._host_count == 0:
            for a, c in pairs:
                a.copy_(c)
        else:
            grouped = _group_tensors_by_device_and_dtype([[a for a, _ in pairs], [c for _, c in pairs]])
            for (averaged_group, current_group), _ in grouped.values():
                self.multi_avg_fn(averaged_group, current_group, self._host_count)
        if not self.use_buffers:
            for b_averaged, b_model in zip(self.module.buffers(), model.buffers()):
                b_averaged.detach().copy_(b_model.detach().to(b_averaged.device))
        self.n_averaged += 1
        self._host_count += 1


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
        if isinstance(self._average_model, AveragedModel):  # built by WeightAveraging.setup: count on the host too
            self._average_model.__class__ = HostCountedAveragedModel
            self._average_model._host_count = 0  # a new average; a checkpoint's load sets it to None (read once)

    def on_train_start(self, trainer, pl_module) -> None:
        # Frozen weights (a LoRA-tuned LLM's base: 135M with SmolLM2) never change, so their average is their
        # first copy; skipping them saves a full pass over them every step. Read once the model is on its device.
        self._frozen = {p.data_ptr() for p in pl_module.parameters() if not p.requires_grad}

    def _average(self, averaged: list[Tensor], current: list[Tensor], num_averaged: int) -> None:
        """Called per dtype group: integer tensors (BERT's position ids, step counters) are copied, not averaged."""
        pairs = [(a, c) for a, c in zip(averaged, current) if c.data_ptr() not in self._frozen]
        if not pairs:
            return
        averaged, current = map(list, zip(*pairs))
        if averaged[0].is_floating_point():
            warmup_ema_(averaged, current, num_averaged, self.decay)
        else:
            torch._foreach_copy_(averaged, current)
