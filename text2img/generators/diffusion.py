"""Pixel-space diffusion with a diffusers denoiser (UNet or diffusion transformer), noise schedule and sampler."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator
from text2img.generators.denoisers import Denoiser, UNetDenoiser
from text2img.generators.flow import RectifiedFlow
from text2img.sampling import runtime
from text2img.sampling.runtime import ImageEdit
from text2img.types import TextEmbedding

__all__ = ["DiffusionGenerator", "ImageEdit"]

# What the network learns to predict: DDPM noise (epsilon), its velocity (v_prediction), or rectified flow's velocity.
OBJECTIVES = ("epsilon", "v_prediction", "flow")
# The samplers a model can switch to at sampling time (`sampler_names`): diffusers' flow-matching ones for flow, and
# for DDPM noise the schedulers diffusers lists as compatible with it, less EDM's (it has its own noise schedule,
# not the model's) and the SDE solver (it needs torchsde).
FLOW_SAMPLERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
UNLISTED_NOISE_SAMPLERS = ("EDMEulerScheduler", "DPMSolverSDEScheduler")


class DiffusionGenerator(Generator):
    """A denoiser with cross-attention on the fused text tokens, trained with DDPM noise or rectified flow.

    `denoiser` builds the network (`Denoiser`: a UNet, `UNetDenoiser`, or a diffusion transformer, `DiTDenoiser`)
    for the space diffusion runs in; the generator calls it as `(x, t, tokens, mask, vector) -> prediction` and
    does not depend on which it is. Configs written before denoisers existed (checkpoints carry theirs) give
    `unet`, a UNet partial, instead: it becomes a `UNetDenoiser`, and their weights load under its names.

    `objective` is what the network predicts: epsilon or v_prediction on `noise_scheduler`'s DDPM noise, sampled
    with `sampler`; or flow, rectified flow's velocity (`flow`, a `RectifiedFlow`: its timestep sampling, shift and
    flow-matching sampler). None takes the noise scheduler's prediction_type, where configs written before
    `objective` existed (checkpoints carry theirs) set it.

    `patch_size` > 1 makes p×p positions of the space one position of the denoiser (the UNet folds them into
    channels, the DiT embeds them as one patch): the model still denoises pixels, at a p²-times cheaper spatial
    resolution, which is what makes 32-px training affordable on a CPU.
    `loss_weighting="min_snr"` clamps the per-timestep weight at `snr_gamma` (Hang et al. 2023),
    which speeds up convergence by not over-weighting the easy low-noise steps.
    `time_vector=True` also adds the fusion head's vector to the denoiser's timestep embedding (through a
    Linear -> SiLU -> Linear projection), as SDXL and Imagen add pooled text.
    """

    requires = consumes = frozenset({"tokens"})
    has_timesteps = True

    def __init__(
        self,
        noise_scheduler: DDPMScheduler,
        sampler: type[SchedulerMixin],
        image_size: int,
        cond_dim: int,
        patch_size: int = 1,
        sampler_kwargs: dict[str, Any] | None = None,
        sample_steps: int = 20,
        guidance_scale: float = 3.0,
        loss_weighting: str = "none",
        snr_gamma: float = 5.0,
        model_channels: int = 3,
        model_size: int | None = None,
        time_vector: bool = False,
        objective: str | None = None,
        flow: RectifiedFlow | None = None,
        denoiser: Callable[..., Denoiser] | None = None,
        unet: Callable[..., UNet2DConditionModel] | None = None,
    ) -> None:
        """`model_channels` and `model_size` describe the space diffusion runs in: the image's by default,
        a first stage's latents for subclasses (which also override `to_model_space`/`from_model_space`)."""
        super().__init__(image_size, cond_dim)
        model_size = image_size if model_size is None else model_size
        if model_size % patch_size:
            divisors = ", ".join(str(d) for d in range(1, model_size + 1) if model_size % d == 0)
            raise ConfigError(
                f"generator.patch_size={patch_size} does not divide the diffusion space's size {model_size}; "
                f"use one of {divisors}"
            )
        if loss_weighting not in ("none", "min_snr"):
            raise ConfigError(f"generator.loss_weighting={loss_weighting!r} is unknown; use none or min_snr")
        objective = check_objective(objective, noise_scheduler, flow, loss_weighting)
        self.model_channels = model_channels
        self.model_size = model_size
        if (denoiser is None) == (unet is None):
            raise ConfigError("give generator.denoiser (conf/generator/denoiser/), or generator.unet alone")
        denoiser = partial(UNetDenoiser, unet) if denoiser is None else denoiser
        self.denoiser = denoiser(
            channels=model_channels, size=model_size, cond_dim=cond_dim, patch_size=patch_size, time_vector=time_vector
        )
        # Every way weights load goes through it: Lightning's checkpoint and EMA restore, load_model, init_from.
        self.register_load_state_dict_pre_hook(_upgrade_old_keys)
        self.time_vector = time_vector
        if time_vector:
            self.requires = self.consumes = frozenset({"tokens", "vector"})
        self.objective = objective
        self.flow = flow if objective == "flow" else None
        if self.flow is not None:  # the flow schedule's config is what its samplers are built from
            noise_scheduler, sampler, sampler_kwargs = self.flow.schedule(), self.flow.sampler, self.flow.sampler_kwargs
        self.noise_scheduler = noise_scheduler
        self.sampler = sampler
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.patch_size = patch_size
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.loss_weighting = loss_weighting
        self.text_blocks = self.denoiser.text_blocks
        self.snr_gamma = snr_gamma
        if self.flow is None:
            alphas = noise_scheduler.alphas_cumprod
            self.register_buffer("snr", alphas / (1 - alphas), persistent=False)

    def upgrade_state_dict(self, state: dict[str, Any], prefix: str = "") -> None:
        """The UNet of a checkpoint (or adapter file) written before denoisers was the generator's `unet`; its keys
        under `prefix` are renamed in place to the `UNetDenoiser`'s."""
        old = prefix + "unet."
        for key in [key for key in state if key.startswith(old)]:
            state[prefix + "denoiser.unet." + key[len(old):]] = state.pop(key)

    def lora_module(self) -> nn.Module:
        """The denoiser: a first stage (latent diffusion) stays frozen."""
        return self.denoiser

    def to_model_space(self, images: Tensor, latents: Tensor | None = None) -> Tensor:
        """Images in [-1, 1] -> what diffusion runs on (`latents`: a batch's cached first-stage output)."""
        return images

    def from_model_space(self, x: Tensor) -> Tensor:
        """The inverse of `to_model_space`: images in [-1, 1]."""
        return x

    def _denoise(self, x: Tensor, t: Tensor, text: TextEmbedding, fusion: FusionHead) -> Tensor:
        cond = fusion(text, t if fusion.timestep_aware else None)
        return self.denoiser(x, t, cond.tokens, cond.mask, cond.vector if self.time_vector else None)

    def training_loss(
        self, images: Tensor, text: TextEmbedding, fusion: FusionHead, latents: Tensor | None = None
    ) -> Tensor:
        x0 = self.to_model_space(images, latents)
        noise = torch.randn_like(x0)
        if self.flow is not None:
            noisy, t, target = self.flow.training_example(x0, noise)
        else:
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
            noisy = self.noise_scheduler.add_noise(x0, noise, t)
            target = noise if self.objective == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)
        pred = self._denoise(noisy, t, text, fusion)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
        if self.loss_weighting == "min_snr":
            snr = self.snr.to(x0.device)[t]
            clamped = torch.clamp(snr, max=self.snr_gamma)
            loss = loss * (clamped / (snr + 1) if self.objective == "v_prediction" else clamped / snr)
        return loss.mean()

    def sampler_names(self) -> list[str]:
        own = self.sampler.__name__
        if self.flow is not None:
            others = list(FLOW_SAMPLERS)
        else:
            compatible = (cls.__name__ for cls in self.noise_scheduler.compatibles)
            others = sorted(name for name in compatible if name not in UNLISTED_NOISE_SAMPLERS)
        return [own, *(name for name in others if name != own)]

    def make_sampler(self, name: str | None = None) -> SchedulerMixin:
        """A fresh sampler (they keep state between steps) on the training noise schedule: the configured one
        (with its `sampler_kwargs`), or the diffusers class `name` of `sampler_names()` at its defaults."""
        if name is None or name == self.sampler.__name__:
            return self.sampler.from_config(self.noise_scheduler.config, **self.sampler_kwargs)
        names = self.sampler_names()
        if name not in names:
            schedule = "rectified flow" if self.flow is not None else "DDPM noise"
            raise ConfigError(
                f"sampler={name} is not a sampler of this model's {schedule} schedule; use one of {', '.join(names)}"
            )
        return getattr(diffusers, name).from_config(self.noise_scheduler.config)

    def check_edit(self, edit: ImageEdit, batch_size: int) -> None:
        """Fail clearly on an edit input that does not fit `batch_size` images of this generator."""
        runtime.check_edit(edit, batch_size, self.image_size, error=ConfigError)

    @torch.no_grad()
    def sample(
        self,
        text: TextEmbedding,
        null_text: TextEmbedding,
        fusion: FusionHead,
        generators: list[torch.Generator],
        guidance_scale: float | None = None,
        steps: int | None = None,
        edit: ImageEdit | None = None,
        sampler: str | None = None,
    ) -> Tensor:
        """See `Generator.sample`; with `edit`, the images are edited instead of drawn from noise.

        The loop is `text2img.sampling.runtime.sample`, the one the exported pipeline runs too; editing happens
        in model space (`to_model_space`/`from_model_space`), so latent subclasses edit unchanged.
        """
        guidance_scale, steps = runtime.sampling_settings(
            guidance_scale, steps, (self.guidance_scale, self.sample_steps),
            self.noise_scheduler.config.num_train_timesteps, error=ConfigError,
        )
        if edit is not None:
            self.check_edit(edit, len(text))
        scheduler = self.make_sampler(sampler)

        def denoise(x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Tensor:
            return self._denoise(x, t, TextEmbedding(tokens, mask, pooled), fusion)

        return runtime.sample(
            denoise, scheduler, (text.tokens, text.mask, text.pooled),
            (null_text.tokens, null_text.mask, null_text.pooled), generators,
            (self.model_channels, self.model_size, self.model_size), guidance_scale, steps, edit=edit,
            to_model_space=self.to_model_space, from_model_space=self.from_model_space, error=ConfigError,
        )


def check_objective(
    objective: str | None, noise_scheduler: DDPMScheduler, flow: RectifiedFlow | None, loss_weighting: str
) -> str:
    """The objective (None: the noise scheduler's prediction_type), checked against the settings it needs."""
    scheduler_prediction = noise_scheduler.config.prediction_type
    objective = scheduler_prediction if objective is None else objective
    if objective not in OBJECTIVES:
        raise ConfigError(f"generator.objective={objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if objective != "flow" and scheduler_prediction != objective:
        raise ConfigError(
            f"generator.noise_scheduler.prediction_type={scheduler_prediction} disagrees with "
            f"generator.objective={objective}; the objective names the prediction: set "
            f"generator.objective={scheduler_prediction} and not the scheduler's prediction_type"
        )
    if objective == "flow" and flow is None:
        raise ConfigError(
            "generator.objective=flow needs generator.flow, its settings; add them as conf/generator/diffusion.yaml has"
        )
    if objective == "flow" and loss_weighting != "none":
        raise ConfigError(
            f"generator.loss_weighting={loss_weighting} weights DDPM noise levels by their SNR and does not apply "
            "to generator.objective=flow; use generator.loss_weighting=none (flow weights t by its sampling)"
        )
    return objective


def _upgrade_old_keys(module: DiffusionGenerator, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook (torch passes the module, also for a deep copy such as the EMA's)."""
    module.upgrade_state_dict(state, prefix)
