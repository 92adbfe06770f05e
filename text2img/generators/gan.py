"""A text-conditional GAN of the DF-GAN family: a text-modulated generator and a (image, text) discriminator.

Trained by `text2img.lightning.AdversarialModule` (two optimisers, one discriminator step then one
generator step per batch); this module holds the networks and the losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator, check_one_pass_sampling, per_sample_noise
from text2img.generators.gan_blocks import DownBlock, FiLM, ModulatedUpBlock, TokenCrossAttention, leaky_relu
from text2img.types import Conditioning, TextEmbedding, masked_mean

BASE_SIZE = 4  # both networks work at 4x4 at their narrow end


def resolutions(image_size: int) -> list[int]:
    """4, 8, ..., image_size; one clear line for sizes the up/down-sampling ladder cannot reach."""
    levels = (image_size // BASE_SIZE).bit_length() - 1
    if image_size < 2 * BASE_SIZE or BASE_SIZE * 2**levels != image_size:
        raise ConfigError(
            f"generator.image_size={image_size} cannot be reached by doubling from {BASE_SIZE}x{BASE_SIZE}; "
            "use 8, 16, 32, 64, 128 or 256 (data.source.image_size)"
        )
    return [BASE_SIZE * 2**level for level in range(levels + 1)]


def widths(image_size: int, width: int, max_multiplier: int) -> list[int]:
    """Channels at each resolution of `resolutions`: `width` at full size, doubling per halving, capped."""
    return [width * min(image_size // size, max_multiplier) for size in resolutions(image_size)]


@dataclass
class DiscriminatorLoss:
    """The discriminator's objective and its parts (each a scalar), for the optimiser and the logs."""

    total: Tensor
    real: Tensor  # hinge on real images with their own captions (target +1)
    fake: Tensor  # hinge on generated images with the captions they were made from (target -1)
    mismatch: Tensor  # hinge on real images with another image's caption (target -1)
    gradient_penalty: Tensor  # matching-aware gradient penalty


class ModulatedGeneratorNet(nn.Module):
    """Noise -> linear -> 4x4 features -> up-blocks modulated by the conditioning vector -> RGB.

    The RGB output is linear (as in StyleGAN), not DF-GAN's tanh: on white-background emoji a tanh output
    saturated at white within 300 steps and its vanishing gradient stopped the generator for good (measured
    in 1,000-batch runs on OpenMoji); the discriminator itself pushes values outside [-1, 1] back, and samples
    are clamped.

    Every block's FiLM layers see the fusion head's vector, concatenated with the noise when
    `noise_in_film` (as DF-GAN does), or take the head's per-layer `film` parameters when it gives them.
    With `attention_resolution` set, the features at that resolution also cross-attend to the fusion head's
    tokens.
    """

    def __init__(
        self,
        image_size: int,
        cond_dim: int,
        width: int,
        max_multiplier: int,
        noise_dim: int,
        noise_in_film: bool,
        attention_resolution: int | None,
        attention_heads: int,
        upsample: str,
    ) -> None:
        super().__init__()
        if upsample not in ("nearest", "bilinear"):
            raise ConfigError(f"generator.upsample={upsample!r} is unknown; use nearest or bilinear")
        self.sizes = resolutions(image_size)
        channels = widths(image_size, width, max_multiplier)[::-1]  # from 4x4 up
        if attention_resolution is not None and attention_resolution not in self.sizes[1:]:
            raise ConfigError(
                f"generator.attention_resolution={attention_resolution} is not a resolution of the generator's "
                f"blocks; use one of {self.sizes[1:]}"
            )
        self.noise_dim = noise_dim
        self.noise_in_film = noise_in_film
        film_dim = cond_dim + (noise_dim if noise_in_film else 0)
        self.stem = nn.Linear(noise_dim, channels[0] * BASE_SIZE**2)
        self.blocks = nn.ModuleList(
            ModulatedUpBlock(c_in, c_out, film_dim, upsample) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.attention_resolution = attention_resolution
        self.attention = None
        if attention_resolution is not None:
            at = channels[self.sizes.index(attention_resolution)]
            self.attention = TokenCrossAttention(at, cond_dim, attention_heads)
        self.to_rgb = nn.Conv2d(channels[-1], 3, 3, padding=1)

    def film_layers(self) -> list[FiLM]:
        """Every FiLM layer, in the order of `Conditioning.film`."""
        return [layer for block in self.blocks for layer in block.film_layers()]

    def forward(self, noise: Tensor, cond: Conditioning) -> Tensor:
        if cond.film is None:
            film_input = torch.cat([noise, cond.vector], dim=1) if self.noise_in_film else cond.vector
            per_block = [None] * len(self.blocks)
        else:
            film_input = None
            layers = len(self.film_layers()) // len(self.blocks)
            per_block = [cond.film[i * layers:(i + 1) * layers] for i in range(len(self.blocks))]
        x = self.stem(noise).view(len(noise), -1, BASE_SIZE, BASE_SIZE)
        for size, block, film in zip(self.sizes[1:], self.blocks, per_block):
            x = block(x, film_input, film)
            if size == self.attention_resolution:
                x = self.attention(x, cond.tokens, cond.mask)
        return self.to_rgb(leaky_relu(x))


class PairDiscriminator(nn.Module):
    """Judges (image, text) pairs: image -> down-blocks -> 4x4 features, joined with the discriminator's OWN
    projection of the raw text embedding (the fusion head belongs to the generator side) -> one logit.

    The text side is LayerNorm'd masked mean of the encoder's tokens and its pooled vector, mapped to
    `text_features`; it is broadcast over the 4x4 grid and concatenated to the image features (DF-GAN).
    """

    def __init__(self, image_size: int, text_dim: int, width: int, max_multiplier: int, text_features: int) -> None:
        super().__init__()
        channels = widths(image_size, width, max_multiplier)  # from full size down
        self.stem = nn.Conv2d(3, channels[0], 3, padding=1)
        self.blocks = nn.Sequential(*(DownBlock(c_in, c_out) for c_in, c_out in zip(channels[:-1], channels[1:])))
        self.token_norm = nn.LayerNorm(text_dim)
        self.pooled_norm = nn.LayerNorm(text_dim)
        self.text_projection = nn.Linear(2 * text_dim, text_features)
        self.joint = nn.Sequential(
            nn.Conv2d(channels[-1] + text_features, 2 * width, 3, padding=1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, BASE_SIZE, bias=False),
        )

    def image_features(self, images: Tensor) -> Tensor:
        return self.blocks(self.stem(images))

    def text_features(self, text: TextEmbedding) -> Tensor:
        tokens = masked_mean(self.token_norm(text.tokens), text.mask)
        return self.text_projection(torch.cat([tokens, self.pooled_norm(text.pooled)], dim=1))

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        grid = text_features[..., None, None].expand(-1, -1, *image_features.shape[-2:])
        return self.joint(torch.cat([image_features, grid], dim=1)).flatten()

    def forward(self, images: Tensor, text: TextEmbedding) -> Tensor:
        return self.logits(self.image_features(images), self.text_features(text))


class GANGenerator(Generator):
    """DF-GAN-style text-to-image GAN: `net` (the generator network, FiLM-modulated by the fusion head's
    vector, optionally cross-attending to its tokens) and `discriminator` (judges image-text pairs).

    Losses (`discriminator_loss`, `generator_loss`): hinge on real pairs (+1), fake pairs (-1) and real
    images with another image's caption (-1, rows whose rolled caption is the same caption are left out),
    the matching-aware gradient penalty `gp_weight * E ||grad_(image, text) D(real, text)||^gp_power` (MA-GP),
    and -D(fake, text) for the generator. A GAN has no single training loss: it trains with model=gan
    (`AdversarialModule`), which alternates the two objectives.
    """

    requires = frozenset({"vector"})
    consumes = frozenset({"vector", "film"})

    def __init__(
        self,
        image_size: int,
        cond_dim: int,
        text_dim: int,
        width: int = 32,
        max_width_multiplier: int = 4,
        noise_dim: int = 100,
        noise_in_film: bool = True,
        upsample: str = "nearest",
        attention: bool = False,
        attention_resolution: int = 16,
        attention_heads: int = 4,
        discriminator_width: int = 32,
        discriminator_text_features: int = 128,
        gp_weight: float = 2.0,
        gp_power: float = 6.0,
    ) -> None:
        super().__init__(image_size, cond_dim)
        if attention:
            self.requires = self.requires | {"tokens"}
            self.consumes = self.consumes | {"tokens"}
        self.net = ModulatedGeneratorNet(
            image_size, cond_dim, width, max_width_multiplier, noise_dim, noise_in_film,
            attention_resolution if attention else None, attention_heads, upsample,
        )
        self.film_channels = tuple(layer.channels for layer in self.net.film_layers())
        self.discriminator = PairDiscriminator(
            image_size, text_dim, discriminator_width, max_width_multiplier, discriminator_text_features
        )
        self.noise_dim = noise_dim
        self.gp_weight = gp_weight
        self.gp_power = gp_power

    def lora_module(self) -> nn.Module:
        """The generator network: the discriminator trains in full (it is not shipped, and it must keep up with
        the adapted generator)."""
        return self.net

    def use_film_head(self) -> None:
        """Take every FiLM layer's (scale, shift) from the fusion head's `film` (fusion=film) instead of
        predicting it from the vector: the predictors are dropped, and the head must give `film`."""
        for layer in self.net.film_layers():
            layer.drop_predictor()
        self.requires = (self.requires - {"vector"}) | {"film"}

    def fake(self, text: TextEmbedding, fusion: FusionHead, noise: Tensor) -> Tensor:
        """Generated images in [-1, 1] for the text and noise [B, noise_dim] (differentiable)."""
        cond = fusion(text)
        missing = [name for name in sorted(self.requires) if getattr(cond, name) is None]
        if missing:
            raise ConfigError(
                f"generator=gan reads the conditioning {missing} but the fusion head gives none; choose a fusion "
                "head that produces them"
            )
        return self.net(noise, cond)

    def training_noise(self, batch_size: int, device: torch.device) -> Tensor:
        return torch.randn(batch_size, self.noise_dim, device=device)

    def discriminator_loss(self, real: Tensor, fake: Tensor, text: TextEmbedding) -> DiscriminatorLoss:
        """DF-GAN's discriminator objective: real + (fake + mismatch) / 2 + MA-GP (fake is detached)."""
        disc = self.discriminator
        real = real.detach().requires_grad_(True)
        text_features = disc.text_features(text)
        real_features = disc.image_features(real)
        real_logits = disc.logits(real_features, text_features)
        # Mismatched pairs: each real image with the next row's caption, except where that is its own caption
        # (repeated captions in a batch give identical embeddings).
        mismatched = ~(text.pooled == text.pooled.roll(1, 0)).all(dim=1)
        mismatch_logits = disc.logits(real_features, text_features.roll(1, 0))
        fake_logits = disc.logits(disc.image_features(fake.detach()), text_features)
        real_loss = F.relu(1 - real_logits).mean()
        fake_loss = F.relu(1 + fake_logits).mean()
        # the mean over the mismatched rows (0 if none), without a host sync: masked, not indexed
        kept = mismatched.to(mismatch_logits.dtype)
        mismatch_loss = (F.relu(1 + mismatch_logits) * kept).sum() / kept.sum().clamp(min=1)
        penalty = self.matching_aware_penalty(real_logits, real, text_features)
        total = real_loss + (fake_loss + mismatch_loss) / 2 + penalty
        return DiscriminatorLoss(total, real_loss, fake_loss, mismatch_loss, penalty)

    def matching_aware_penalty(self, real_logits: Tensor, real: Tensor, text_features: Tensor) -> Tensor:
        """MA-GP: gp_weight * mean over the batch of ||(dD/dimage, dD/dtext)||^gp_power on real matching pairs,
        which smooths the discriminator around the real data manifold so the generator gets useful gradients."""
        grads = torch.autograd.grad(real_logits.sum(), (real, text_features), create_graph=True)
        norm = torch.cat([g.flatten(1) for g in grads], dim=1).float().norm(dim=1)
        return self.gp_weight * norm.pow(self.gp_power).mean()

    def generator_loss(self, fake: Tensor, text: TextEmbedding) -> Tensor:
        """Hinge generator loss: -D(fake, text), which pushes generated pairs towards the real side."""
        return -self.discriminator(fake, text).mean()

    def training_loss(
        self, images: Tensor, text: TextEmbedding, fusion: FusionHead, latents: Tensor | None = None
    ) -> Tensor:
        raise ConfigError(
            "generator=gan has two objectives and trains only with model=gan (two optimisers, alternating steps); "
            "drop the model= override"
        )

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
        check_one_pass_sampling("gan", guidance_scale, steps, sampler)
        noise = per_sample_noise((self.noise_dim,), generators, text.tokens.device)
        return self.fake(text, fusion, noise).float().clamp(-1, 1)
