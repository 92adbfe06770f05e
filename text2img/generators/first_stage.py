"""The frozen image autoencoder that latent diffusion runs in: a diffusers `AutoencoderKL`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from text2img.metrics.frozen import FrozenNetwork


class FirstStage(FrozenNetwork):
    """A frozen `AutoencoderKL`: images in [-1, 1] <-> unscaled latents [B, C, H/f, W/f].

    `source` says where the weights came from (a text2img VAE checkpoint, a diffusers folder or a hub
    name); `identity()` keys caches of its latents.
    """

    def __init__(self, autoencoder: AutoencoderKL, source: str) -> None:
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.source = source

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        """How many pixels one latent position covers along each side."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @torch.no_grad()
    def moments(self, images: Tensor) -> Tensor:
        """Posterior parameters [B, 2C, h, w]: mean and log-variance, what a latent cache stores."""
        return self.autoencoder.encode(images).latent_dist.parameters

    @staticmethod
    def sample_posterior(moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A latent drawn from posterior parameters (as `AutoencoderKL`'s own distribution clamps them)."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents).sample

    def identity(self) -> dict[str, Any]:
        return {"class": "AutoencoderKL", "source": self.source, "config": dict(self.autoencoder.config)}
