"""Latent diffusion: the diffusion generator run on a frozen first stage's latents (Rombach et al. 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.diffusion import DiffusionGenerator
from text2img.generators.first_stage import FirstStage
from text2img.types import TextEmbedding

# Images encoded at once when calibrating the latent scale (bounds memory, not results).
CALIBRATION_BATCH = 64


class LatentDiffusionGenerator(DiffusionGenerator):
    """`DiffusionGenerator` whose model space is `first_stage`'s latents, multiplied by `latent_scale`.

    The scale brings latents to unit variance, which the noise schedule assumes. `latent_scale=None` means
    "compute it from data": `calibrate` sets it to 1/std of the latents of the calibration images, once (a
    resumed run or a loaded checkpoint keeps the stored value). It lives in a persistent buffer, where 0
    means "not set yet", so checkpoints carry it.

    With `cache_latents`, training batches must carry the first stage's cached posterior moments
    (`Batch.latents`, served by the data module), and the first stage's encoder never runs in a step.
    `diffusion` holds `DiffusionGenerator`'s arguments; its model space is set from the first stage.
    """

    def __init__(
        self,
        first_stage: FirstStage,
        image_size: int,
        latent_scale: float | None = None,
        cache_latents: bool = False,
        **diffusion: Any,
    ) -> None:
        if latent_scale is not None and not latent_scale > 0:
            raise ConfigError(
                f"generator.latent_scale={latent_scale} must be positive (e.g. 0.18215 for the Stable Diffusion "
                "VAE), or null to compute it from the training images"
            )
        factor = first_stage.downsample
        if image_size % factor:
            raise ConfigError(
                f"generator=ldm: the first stage ({first_stage.source}) downsamples by {factor}, which does not "
                f"divide data.source.image_size={image_size}; use a multiple of {factor} or another first stage"
            )
        latent_size = image_size // factor
        super().__init__(
            image_size=image_size, model_channels=first_stage.latent_channels, model_size=latent_size, **diffusion
        )
        self.first_stage = first_stage
        self.cache_latents = cache_latents
        self.register_buffer("latent_scale", torch.tensor(0.0 if latent_scale is None else float(latent_scale)))

    def scale(self) -> Tensor:
        """The latent scaling factor; fails clearly while it is unset (never silently 0 or 1)."""
        if not self.latent_scale > 0:
            raise RuntimeError(
                "the latent scale of generator=ldm is not set: it is computed by calibrate() at fit start "
                "(or loaded with a checkpoint); set generator.latent_scale to a number to skip calibration"
            )
        return self.latent_scale

    @torch.no_grad()
    def calibrate(self, images: Tensor) -> None:
        if self.latent_scale > 0:  # configured, resumed or loaded: never recomputed
            return
        # Posterior samples drawn with a fixed CPU generator: every process computes the same scale.
        generator = torch.Generator().manual_seed(0)
        latents = torch.cat([
            self.first_stage.sample_posterior(self.first_stage.moments(chunk).float().cpu(), generator)
            for chunk in images.split(CALIBRATION_BATCH)
        ])
        self.latent_scale.fill_(1.0 / latents.std().item())

    def training_loss(
        self, images: Tensor, text: TextEmbedding, fusion: FusionHead, latents: Tensor | None = None
    ) -> Tensor:
        if self.cache_latents and latents is None:
            raise RuntimeError(
                "generator.cache_latents=true but the batch carries no cached latents; build the data module "
                "with text2img.run.compose.build_model, which connects it to the latent cache"
            )
        return super().training_loss(images, text, fusion, latents)

    def to_model_space(self, images: Tensor, latents: Tensor | None = None) -> Tensor:
        """Scaled latents: drawn from the posterior in training (as LDM does), its mean otherwise, so that
        encoding an image to edit it is deterministic."""
        moments = self.first_stage.moments(images) if latents is None else latents
        if self.training:
            return self.first_stage.sample_posterior(moments) * self.scale()
        return moments.chunk(2, dim=1)[0] * self.scale()

    def from_model_space(self, x: Tensor) -> Tensor:
        return self.first_stage.decode(x / self.scale())
