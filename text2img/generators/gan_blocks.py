"""Building blocks of the DF-GAN-style text-conditional GAN (Tao et al., 2022, "DF-GAN: A Simple and
Effective Baseline for Text-to-Image Synthesis"): text-modulated up-sampling blocks for the generator,
residual down-sampling blocks for the discriminator, and an optional cross-attention on text tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# (scale, shift) pairs, each [B, C], of consecutive FiLM layers
FiLMParameters = tuple[tuple[Tensor, Tensor], ...]


def leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


class FiLM(nn.Module):
    """x * gamma(c) + beta(c): a per-channel scale and shift predicted from a conditioning vector.

    The MLP's last layer starts at zero weights with gamma's bias at one, so the block starts as the
    identity (DF-GAN's affine initialisation): the text steers the features gradually instead of
    scrambling them at the first step.

    Given `film`, a (scale, shift) pair [B, channels] from a fusion head (fusion=film), the layer applies it
    instead; a layer that always takes it drops its MLP (`drop_predictor`).
    """

    # What LoRA adapts by default (text2img.utils.lora.default_targets): the MLP predicting scale and shift.
    lora_targets = ("mlp.0", "mlp.2")

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        with torch.no_grad():
            self.mlp[-1].bias.copy_(torch.cat([torch.ones(channels), torch.zeros(channels)]))

    def drop_predictor(self) -> None:
        """For a layer whose (scale, shift) always comes from the fusion head: no unused parameters."""
        self.mlp = None

    def forward(self, x: Tensor, cond: Tensor | None, film: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if film is None:
            gamma, beta = self.mlp(cond)[..., None, None].chunk(2, dim=1)
        else:
            gamma, beta = (value[..., None, None] for value in film)
        return x * gamma + beta


class TextFusion(nn.Module):
    """DF-GAN's deep fusion block: two FiLM layers, each followed by a leaky ReLU."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.first = FiLM(cond_dim, channels)
        self.second = FiLM(cond_dim, channels)

    def forward(self, x: Tensor, cond: Tensor | None, film: FiLMParameters | None = None) -> Tensor:
        """`film`: the (scale, shift) pairs of `first` and `second`, or None to predict them from `cond`."""
        first, second = (None, None) if film is None else film
        return leaky_relu(self.second(leaky_relu(self.first(x, cond, first)), cond, second))


class ModulatedUpBlock(nn.Module):
    """2x up-sampling (`upsample`: an `F.interpolate` mode), then a residual branch fuse -> conv3x3 -> fuse ->
    conv3x3 where every fusion is modulated by the conditioning; a 1x1 shortcut where the width changes."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, upsample: str = "nearest") -> None:
        super().__init__()
        self.upsample = upsample
        self.fuse_in = TextFusion(cond_dim, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.fuse_out = TextFusion(cond_dim, out_channels)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor | None, film: FiLMParameters | None = None) -> Tensor:
        """`film`: the (scale, shift) pairs of its four FiLM layers in order (see `film_layers`), or None to
        predict them from `cond`."""
        fuse_in, fuse_out = (None, None) if film is None else (film[:2], film[2:])
        x = F.interpolate(x, scale_factor=2.0, mode=self.upsample)
        h = self.conv_out(self.fuse_out(self.conv_in(self.fuse_in(x, cond, fuse_in)), cond, fuse_out))
        return self.shortcut(x) + h

    def film_layers(self) -> list[FiLM]:
        """Its FiLM layers in the order `forward` takes their parameters."""
        return [self.fuse_in.first, self.fuse_in.second, self.fuse_out.first, self.fuse_out.second]


class TokenCrossAttention(nn.Module):
    """Image positions attend to the conditioning tokens (masked), added back through a zero-initialised
    gate so that switching attention on does not disturb the start of training."""

    def __init__(self, channels: int, token_dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.attention = nn.MultiheadAttention(channels, heads, kdim=token_dim, vdim=token_dim, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        query = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        attended, _ = self.attention(query, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        return x + self.gate * attended.transpose(1, 2).reshape(batch, channels, height, width)


class DownBlock(nn.Module):
    """DF-GAN's discriminator block: a residual branch conv4x4/2 -> conv3x3 (leaky ReLUs) scaled by a learned
    gate that starts at zero, on a shortcut of 1x1 conv (where the width changes) and 2x average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.LeakyReLU(0.2),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.shortcut(x), 2) + self.gate * self.residual(x)
