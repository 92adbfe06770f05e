"""The fusion-head contract: LLM hidden states (and optionally a timestep) in, generator conditioning out."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.types import Conditioning, TextEmbedding


class FusionHead(nn.Module, ABC):
    """Maps a `TextEmbedding` [B, L, in_dim] to the `Conditioning` a generator consumes.

    `produces` names the conditioning fields it fills ("tokens", "vector"); `timestep_aware` heads
    also take the diffusion timestep and are only valid with generators that have timesteps.
    """

    produces: frozenset[str]
    timestep_aware: bool = False

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    @abstractmethod
    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning: ...


def feature_norm(kind: str, dim: int) -> nn.Module:
    """Normalisation applied to raw LLM features, whose scale varies by layer and carries outliers."""
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"fusion.norm={kind!r} is not a normalisation; use one of: layer, rms, none")


