"""The generator-backend contract, and the check that a fusion head and a backend fit together."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.sampling.runtime import per_sample_noise
from text2img.types import TextEmbedding

__all__ = ["Generator", "check_one_pass_sampling", "per_sample_noise"]


class Generator(nn.Module, ABC):
    """An image generator conditioned on the output of a fusion head.

    `requires` names the conditioning fields it cannot run without ("tokens" for cross-attention, "vector",
    "film"): the fusion head must produce all of them; `consumes` those it reads (required or not);
    `film_channels` the channels of its FiLM layers, in order, when it takes per-layer FiLM parameters
    (`Conditioning.film`); `cond_dim` is the size the fusion head must produce; `has_timesteps` says whether a
    timestep-aware fusion head can be driven by it; `reconstructs` says whether it implements
    `reconstruct` (autoencoders), which evaluation then scores with PSNR/SSIM; `text_blocks` the number of blocks
    that can each cross-attend to their own token set (deep fusion: a diffusion transformer's depth), else None.
    """

    requires: frozenset[str]
    consumes: frozenset[str]
    film_channels: tuple[int, ...] = ()
    has_timesteps: bool = False
    reconstructs: bool = False
    text_blocks: int | None = None

    def __init__(self, image_size: int, cond_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.cond_dim = cond_dim

    @abstractmethod
    def training_loss(
        self, images: Tensor, text: TextEmbedding, fusion: FusionHead, latents: Tensor | None = None
    ) -> Tensor:
        """Scalar loss for images in [-1, 1] and their (possibly caption-dropped) text.

        `latents` is the batch's cached first-stage encoding, for backends that have a frozen first stage
        (see `Batch.latents`); others ignore it.
        """

    def calibrate(self, images: Tensor) -> None:
        """Fit data-dependent constants before training starts (e.g. a latent scaling factor), from a fixed
        sample of training images in [-1, 1]; the values must live in buffers so checkpoints keep them."""

    @abstractmethod
    def sample(
        self,
        text: TextEmbedding,
        null_text: TextEmbedding,
        fusion: FusionHead,
        generators: list[torch.Generator],
        guidance_scale: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
    ) -> Tensor:
        """Images in [-1, 1], [B, 3, H, W], for the given text; `null_text` is the unconditional branch.
        `guidance_scale`, `steps` and `sampler` (a class name of `sampler_names()`) default to the generator's own.

        `generators` holds one CPU generator per sample: all randomness of sample i comes from
        `generators[i]`, so an image does not depend on the batch it is generated in.
        """

    def sampler_names(self) -> list[str]:
        """The samplers `sample` takes by name, the generator's own first (none for one-pass generators)."""
        return []

    def upgrade_state_dict(self, state: dict[str, Any], prefix: str = "") -> None:
        """Rename in place the keys under `prefix` that a checkpoint written by an older version uses (none here)."""

    def lora_module(self) -> nn.Module:
        """The part LoRA adapts with `generator_peft=lora` (the whole generator unless a subclass says otherwise)."""
        return self

    def reconstruct(self, images: Tensor, text: TextEmbedding, fusion: FusionHead) -> Tensor:
        """Images in [-1, 1] passed through the model and back (only where `reconstructs` is True)."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct images")


def check_one_pass_sampling(
    generator_name: str, guidance_scale: float | None, steps: int | None, sampler: str | None
) -> None:
    """Generators that draw an image in one pass (GAN, VAE) take neither guidance, a step count nor a sampler; say
    so instead of silently ignoring them (1, no guidance, is accepted)."""
    if guidance_scale not in (None, 1):
        raise ConfigError(
            f"guidance_scale={guidance_scale} does not apply to generator={generator_name} (one pass, no guidance); "
            "leave it unset (or 1)"
        )
    if steps is not None:
        raise ConfigError(
            f"steps={steps} does not apply to generator={generator_name} (one pass, no sampling steps); leave it unset"
        )
    if sampler is not None:
        raise ConfigError(
            f"sampler={sampler} does not apply to generator={generator_name} (one pass, no sampler); leave it unset"
        )
