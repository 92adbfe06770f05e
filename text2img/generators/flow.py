"""Rectified flow (Liu et al. 2022), as SD3 (Esser et al. 2024) and Sana train it: `generator.objective=flow`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from text2img.errors import ConfigError

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


class RectifiedFlow:
    """The straight path x_t = (1 - t) x0 + t noise, t in [0, 1], and its velocity noise - x0, which the network
    predicts at timestep t * `num_train_timesteps`: the scale of diffusers' flow-matching schedulers, which sample.

    Training draws t from `timesteps`, uniform or logit-normal (sigmoid of N(`logit_mean`, `logit_std`): SD3's
    choice, which spends the steps on the middle of the path, where the velocity is hardest to predict), then
    shifts it, t' = shift t / (1 + (shift - 1) t). The sampler applies the same shift to its schedule (it is in the
    schedule's config), so training and sampling agree on where the steps go; shift > 1 moves both towards noise,
    which larger images need (SD3: 3 at 1024 px; 1 suits 32 px).

    `sampler` is a diffusers flow-matching scheduler class, built from `schedule()`'s config with `sampler_kwargs`.
    """

    def __init__(
        self,
        timesteps: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        sampler: type[SchedulerMixin] = FlowMatchEulerDiscreteScheduler,
        sampler_kwargs: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
    ) -> None:
        if timesteps not in TIMESTEP_SAMPLING:
            raise ConfigError(
                f"generator.flow.timesteps={timesteps!r} is unknown; use one of {', '.join(TIMESTEP_SAMPLING)}"
            )
        if not logit_std > 0:
            raise ConfigError(f"generator.flow.logit_std={logit_std} must be positive; use e.g. 1.0 (SD3)")
        if not shift > 0:
            raise ConfigError(f"generator.flow.shift={shift} must be positive; use 1 for no shift (SD3: 3)")
        self.timesteps = timesteps
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift
        self.sampler = sampler
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.num_train_timesteps = num_train_timesteps

    def schedule(self) -> FlowMatchEulerDiscreteScheduler:
        """The schedule in diffusers' terms: the config (timestep scale, shift) that samplers are built from."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)

    def sample_t(self, batch: int, device: torch.device) -> Tensor:
        """Training noise levels t [batch] in [0, 1], drawn and shifted as configured."""
        t = compute_density_for_timestep_sampling(
            self.timesteps, batch, logit_mean=self.logit_mean, logit_std=self.logit_std, device=device
        )
        return self.shift * t / (1 + (self.shift - 1) * t)

    def training_example(self, x0: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, the network's timesteps t * num_train_timesteps, the velocity target) for a batch x0."""
        t = self.sample_t(x0.shape[0], x0.device)
        sigma = t.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise, t * self.num_train_timesteps, noise - x0
