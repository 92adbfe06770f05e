"""The fusion-head contract: LLM hidden states (and optionally a timestep) in, generator conditioning out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.types import Conditioning, TextEmbedding


class FusionHead(nn.Module, ABC):
    """Maps a `TextEmbedding` [B, L, in_dim] to the `Conditioning` a generator consumes.

    `produces` names the conditioning fields it fills ("tokens", "vector"); `timestep_aware` heads
    also take the diffusion timestep and are only valid with generators that have timesteps; `text_blocks` is the
    number of generator blocks a deep-fusion head gives their own token sets (None: one set for all).
    """

    produces: frozenset[str]
    timestep_aware: bool = False
    text_blocks: int | None = None

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

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


