"""The fusion-head contract: LLM hidden states (and optionally a timestep) in, generator conditioning out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.types import Conditioning, TextEmbedding

LAYER_MIXES = ("none", "softmax")


class LayerMix(nn.Module):
    """A learned average of `layers` layers that the encoder put side by side ([..., layers x width] features):
    softmax(logits)-weighted, the logits starting at zero, so it starts as the plain average of the layers and
    learns which to read (NVIDIA's CVPR 2025 encoder study's learned variant of the normalised average)."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.logits = nn.Parameter(torch.zeros(layers))

    def weights(self) -> Tensor:
        return self.logits.softmax(0)

    def forward(self, text: TextEmbedding) -> TextEmbedding:
        weights = self.weights().to(text.tokens.dtype)

        def mixed(features: Tensor) -> Tensor:
            return (features.unflatten(-1, (-1, self.width)) * weights[:, None]).sum(-2)

        return TextEmbedding(mixed(text.tokens), text.mask, mixed(text.pooled))


class FusionHead(nn.Module, ABC):
    """Maps a `TextEmbedding` [B, L, in_dim] to the `Conditioning` a generator consumes.

    `produces` names the conditioning fields it fills ("tokens", "vector"); `timestep_aware` heads
    also take the diffusion timestep and are only valid with generators that have timesteps; `text_blocks` is the
    number of generator blocks a deep-fusion head gives their own token sets (None: one set for all).

    `layer_mix="softmax"` reads text whose features are several layers side by side (`encoder.combine=concat`,
    `in_dim` = layers x `layer_width`) through a learned `LayerMix` first: the head then works on `text_dim` =
    `layer_width` features. Without it `text_dim` is `in_dim`.
    """

    produces: frozenset[str]
    timestep_aware: bool = False
    text_blocks: int | None = None

    def __init__(self, in_dim: int, out_dim: int, layer_mix: str = "none", layer_width: int | None = None) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.text_dim = in_dim
        self.layer_mix: LayerMix | None = None
        if layer_mix not in LAYER_MIXES:
            raise ConfigError(f"fusion.layer_mix={layer_mix!r} is unknown; use one of: {', '.join(LAYER_MIXES)}")
        if layer_mix == "softmax":
            if layer_width is None or in_dim % layer_width or in_dim == layer_width:
                raise ConfigError(
                    f"fusion.layer_mix=softmax averages several layers, but the text has {in_dim} features, not "
                    f"several layers of {layer_width}; read them side by side, e.g. encoder.layers=all "
                    "encoder.combine=concat"
                )
            self.layer_mix = LayerMix(in_dim // layer_width, layer_width)
            self.text_dim = layer_width

    def __call__(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        # The mix runs before any head's own forward (and its hooks), so no head has to remember it.
        return super().__call__(text if self.layer_mix is None else self.layer_mix(text), timestep)

    @abstractmethod
    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning: ...


NORMS = ("layer", "rms", "rms_scaled", "none")


class ScaledRMSNorm(nn.RMSNorm):
    """RMSNorm whose output is multiplied by one learnable scalar that starts small (Sana: 0.01), so the text
    enters the generator quietly at first and its strength is learnt."""

    def __init__(self, dim: int, scale: float = 0.01) -> None:
        super().__init__(dim)
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


def feature_norm(kind: str, dim: int) -> nn.Module:
    """Normalisation applied to raw LLM features, whose scale varies by layer and carries outliers."""
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim)
    if kind == "rms_scaled":
        return ScaledRMSNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"fusion.norm={kind!r} is not a normalisation; use one of: {', '.join(NORMS)}")


def embed_timestep(time_proj: nn.Module, time_embedding: nn.Module, timestep: Tensor, tokens: Tensor) -> Tensor:
    """[B, time_dim]: the timestep ([B] or a scalar, the sampler's int64 or float timesteps) through sinusoids
    (float32 whatever its dtype) and an MLP run in the tokens' dtype, one row per row of `tokens` [B, ...]."""
    steps = timestep.reshape(-1).expand(tokens.shape[0])
    return time_embedding(time_proj(steps).to(tokens.dtype))


