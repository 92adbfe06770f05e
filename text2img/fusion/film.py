"""Per-layer FiLM parameters (a scale and a shift per channel) from the LLM's features, for generators with
FiLM layers (generator=gan)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.pooled_mlp import PooledMLP
from text2img.types import Conditioning, TextEmbedding


class FiLMHead(PooledMLP):
    """`PooledMLP`'s pooled text vector as a shared trunk, then one linear map per FiLM layer of the generator to
    its (scale, shift), each [B, C_i]: `film` only (no tokens, no vector).

    The per-layer maps start at zero and the scale is 1 + their first half, so at step 0 every layer gets
    scale 1 and shift 0: the generator starts unmodulated. `film_channels` (the generator's C_i, in order) is
    filled from the generator when the model is built (`text2img.generators.build_fusion`).
    """

    produces = frozenset({"film"})

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        film_channels: list[int] | tuple[int, ...] | None = None,
        pooling: str = "mean",
        hidden_dim: int | None = None,
        norm: str = "layer",
        dropout: float = 0.0,
        layer_mix: str = "none",
        layer_width: int | None = None,
    ) -> None:
        """`out_dim` is the trunk's width; the other settings are `PooledMLP`'s."""
        super().__init__(in_dim, out_dim, pooling, hidden_dim, norm, dropout, layer_mix, layer_width)
        if not film_channels:
            raise ConfigError(
                "fusion.film_channels is not set; build the head with text2img.generators.build_fusion, which takes "
                "them from the generator (or give the generator's FiLM channel list)"
            )
        self.film_channels = tuple(film_channels)
        self.to_film = nn.ModuleList(nn.Linear(out_dim, 2 * channels) for channels in self.film_channels)
        for layer in self.to_film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        trunk = F.silu(super().forward(text).vector)
        film = []
        for layer in self.to_film:
            scale, shift = layer(trunk).chunk(2, dim=1)
            film.append((1 + scale, shift))
        return Conditioning(film=tuple(film))
