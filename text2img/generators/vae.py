"""A text-conditional VAE on diffusers' `AutoencoderKL`, and its unconditional variant (a first stage)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator, check_one_pass_sampling, per_sample_noise
from text2img.networks.effnet import EfficientNetLite0Features
from text2img.types import TextEmbedding


class EffNetPerceptualLoss:
    """An LPIPS-style distance on frozen EfficientNet-Lite0 feature maps, differentiable in the images.

    Images are resized to `input_size` (the network was trained at 224, but on a CPU that adds ~5x the
    VAE's own step time; 64 adds ~12%), the feature maps at the end of `stages` (the network's resolution
    stages; 2-5 have strides 4, 8, 16, 16) are unit-normalised over channels and their squared differences
    averaged, as LPIPS does without its learned per-channel weights. The loss: `weight` x their sum.
    Off by default: on `experiment=openmoji_vae` (weight 0.1, 64 px) it cost 27% more CPU time and traded
    PSNR and text alignment for FID (test FID 133 vs 152, PSNR 21.1 vs 21.9 dB, LiT clip score 5.4 vs 7.8).

    Deliberately not an `nn.Module`: the frozen network is an instrument, so it stays out of the generator's
    checkpoint, parameter count and EMA (whose averaging cannot lerp BatchNorm's integer counters); it
    follows the images to their device when called.
    """

    # index of the last MBConv block of each resolution stage of EfficientNet-Lite0 (16 blocks)
    STAGE_ENDS = (0, 2, 4, 7, 10, 14, 15)

    def __init__(
        self, weight: float = 1.0, input_size: int = 64, stages: tuple[int, ...] = (2, 3, 4, 5)
    ) -> None:
        if not all(1 <= s <= len(self.STAGE_ENDS) for s in stages):
            raise ConfigError(
                f"perceptual stages={list(stages)} are out of range; use stages 1..{len(self.STAGE_ENDS)}"
            )
        self.weight = weight
        self.input_size = input_size
        self.taps = {self.STAGE_ENDS[s - 1] for s in stages}
        self.extractor = EfficientNetLite0Features()  # frozen, in eval mode for good

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """Images in [-1, 1] -> unit-normalised feature maps at the chosen stages (gradients flow)."""
        net = self.extractor.net
        size = (self.input_size, self.input_size)
        x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
        x = ((x + 1) * 127.5 - 127) / 128  # the Lite models' preprocessing of [0, 255] pixels
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps = []
        for index, block in enumerate(net._blocks[: max(self.taps) + 1]):
            x = block(x)
            if index in self.taps:
                maps.append(x / (x.norm(dim=1, keepdim=True) + 1e-8))
        return maps

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor:
        if self.extractor.net._conv_stem.weight.device != images.device:
            self.extractor.to(images.device)
        with torch.no_grad():
            target_maps = self.feature_maps(targets)
        distance = sum((a - b).pow(2).sum(1).mean() for a, b in zip(self.feature_maps(images), target_maps))
        return self.weight * distance


class VAEGenerator(Generator):
    """A VAE whose encoder, quant convs and decoder are a diffusers `AutoencoderKL`.

    Unconditional (`conditional=False`) it is exactly an `AutoencoderKL` (`self.autoencoder`: savable with
    `save_pretrained`, usable as a latent-diffusion first stage) with a standard normal prior; the text is
    unused.

    Conditional, the text (the fusion head's `vector`) enters twice, as in Sohn et al.'s conditional VAE:
    - a learned prior p(z | text), a diagonal Gaussian over the latent grid (`text_to_prior`, zero-
      initialised, so training starts from N(0, I)). The KL pulls each image's posterior to its caption's
      prior, so a sample drawn from it is placed where that caption's images encode. This is what makes
      samples follow the text: with a fixed N(0, I) prior the decoder learned to ignore it (measured after
      600 steps: pixel std 0.01 across 32 prompts for one latent, 0.15 across latents for one prompt; LiT
      clip score at the shuffled-caption floor);
    - the decoder's input: an MLP maps the vector to `cond_channels` features, broadcast over the latent grid
      and concatenated to the latent (the decoder is diffusers' own, with a wider `conv_in`). Modulating every
      decoder normalisation instead (diffusers' spatial norm, FiLM at every depth) cost 36% more CPU time and
      gave better PSNR but worse samples (test FID 186 vs 175, clip score 2.7 vs 4.5 after 600 steps).
    The encoder stays text-free: reconstructions test the autoencoder.

    Loss: the reconstruction error (`reconstruction`: l1 by default, as in Stable Diffusion's VAE; mse reached
    19.6 against 17.9 dB PSNR in openmoji_ldm's 250-step first stage, with colours no better: see
    experiments/default_model) + `kl_weight` x KL(posterior || prior), the KL in nats per image divided by the
    image's number of values: with l1 the loss is the negative ELBO (up to a constant factor) of a Laplace
    decoder of scale `kl_weight` in [-1, 1] pixel units (with mse, a Gaussian one of variance kl_weight / 2).
    None picks the variant's default (`DEFAULT_KL_WEIGHT`). `perceptual` optionally adds an
    `EffNetPerceptualLoss`.
    """

    requires = consumes = frozenset({"vector"})
    reconstructs = True
    # Measured on OpenMoji 32 px (300 steps, N(0, I) prior; kl_weight 1e-3 / 1e-2 / 0.1 / 0.3 / 1): PSNR
    # 20.1 / 20.1 / 19.7 / 19.5 / 18.1 dB, FID of prior samples 322 / 323 / 238 / 198 / 178. The conditional
    # VAE is judged by its samples, so it takes a strong KL; a first stage by its reconstructions, so a weak
    # one (1e-2 costs no PSNR against 1e-3 and halves the KL: tamer latents; latent diffusion rescales them).
    DEFAULT_KL_WEIGHT: ClassVar[dict[bool, float]] = {True: 0.3, False: 1e-2}
    RECONSTRUCTION_ERRORS: ClassVar[dict[str, Callable[[Tensor], Tensor]]] = {
        "l1": torch.abs,
        "mse": torch.square,
    }

    def __init__(
        self,
        autoencoder: Callable[..., AutoencoderKL],
        image_size: int,
        cond_dim: int,
        conditional: bool = True,
        cond_channels: int = 32,
        prior_hidden: int = 256,
        kl_weight: float | None = None,
        perceptual: EffNetPerceptualLoss | None = None,
        reconstruction: str = "l1",
    ) -> None:
        super().__init__(image_size, cond_dim)
        kl_weight = self.DEFAULT_KL_WEIGHT[conditional] if kl_weight is None else kl_weight
        if kl_weight < 0:
            raise ConfigError(f"generator.kl_weight={kl_weight} is negative; use 0 or more (e.g. 0.01)")
        if reconstruction not in self.RECONSTRUCTION_ERRORS:
            raise ConfigError(
                f"generator.reconstruction={reconstruction!r} is unknown; "
                f"use one of {', '.join(self.RECONSTRUCTION_ERRORS)}"
            )
        self.reconstruction_error = self.RECONSTRUCTION_ERRORS[reconstruction]
        self.autoencoder = autoencoder(sample_size=image_size, in_channels=3, out_channels=3)
        self.conditional = conditional
        self.kl_weight = kl_weight
        self.perceptual = perceptual
        config = self.autoencoder.config
        if image_size % self.downsample:
            raise ConfigError(
                f"generator.autoencoder has {len(config.block_out_channels)} levels (downsampling "
                f"{self.downsample}x), which does not divide image_size={image_size}; "
                "use fewer block_out_channels"
            )
        if not conditional:
            # The text is unused: any head will do.
            self.requires = self.consumes = frozenset()
            return
        # What LoRA adapts by default besides the autoencoder's attention (text2img.utils.lora.default_targets).
        self.lora_targets = ("text_to_map.0", "text_to_map.2", "text_to_prior.0", "text_to_prior.2")
        self.text_to_map = nn.Sequential(
            nn.Linear(cond_dim, cond_channels), nn.SiLU(), nn.Linear(cond_channels, cond_channels)
        )
        self.text_to_prior = nn.Sequential(
            nn.Linear(cond_dim, prior_hidden),
            nn.SiLU(),
            nn.Linear(prior_hidden, 2 * math.prod(self.latent_shape)),
        )
        nn.init.zeros_(self.text_to_prior[-1].weight)
        nn.init.zeros_(self.text_to_prior[-1].bias)
        conv_in = self.autoencoder.decoder.conv_in
        self.autoencoder.decoder.conv_in = nn.Conv2d(
            config.latent_channels + cond_channels,
            conv_in.out_channels,
            conv_in.kernel_size,
            padding=conv_in.padding,
        )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.image_size // self.downsample
        return (self.autoencoder.config.latent_channels, size, size)

    def text_vector(self, text: TextEmbedding, fusion: FusionHead) -> Tensor | None:
        return fusion(text).vector if self.conditional else None

    def prior(self, vector: Tensor) -> DiagonalGaussianDistribution:
        """p(z | text) of the conditional VAE (the unconditional one's prior is the standard normal)."""
        parameters = self.text_to_prior(vector).float().view(len(vector), -1, *self.latent_shape[1:])
        return DiagonalGaussianDistribution(parameters)

    def decode(self, latents: Tensor, vector: Tensor | None) -> Tensor:
        """Latents [B, C, h, w] (and the text's vector when conditional) -> images, about [-1, 1]."""
        if not self.conditional:
            return self.autoencoder.decode(latents).sample
        if self.autoencoder.post_quant_conv is not None:
            latents = self.autoencoder.post_quant_conv(latents)
        text_map = self.text_to_map(vector.to(latents.dtype))[:, :, None, None]
        text_map = text_map.expand(-1, -1, *latents.shape[-2:])
        return self.autoencoder.decoder(torch.cat([latents, text_map], dim=1))

    def training_loss(
        self, images: Tensor, text: TextEmbedding, fusion: FusionHead, latents: Tensor | None = None
    ) -> Tensor:
        posterior = self.autoencoder.encode(images).latent_dist
        vector = self.text_vector(text, fusion)
        reconstruction = self.decode(posterior.sample(), vector)
        loss = self.reconstruction_error(reconstruction.float() - images.float()).mean()
        kl = posterior.kl() if vector is None else posterior.kl(self.prior(vector))
        loss = loss + self.kl_weight * kl.float().mean() / images[0].numel()
        if self.perceptual is not None:
            loss = loss + self.perceptual(reconstruction, images)
        return loss

    @torch.no_grad()
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
        check_one_pass_sampling("vae", guidance_scale, steps, sampler)
        z = per_sample_noise(self.latent_shape, generators, text.tokens.device)
        vector = self.text_vector(text, fusion)
        if vector is not None:
            prior = self.prior(vector)
            z = prior.mean + prior.std * z
        return self.decode(z.to(self.autoencoder.dtype), vector).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, text: TextEmbedding, fusion: FusionHead) -> Tensor:
        """The posterior mean, decoded (with the text when conditional)."""
        mean = self.autoencoder.encode(images).latent_dist.mode()
        return self.decode(mean, self.text_vector(text, fusion)).float().clamp(-1, 1)
