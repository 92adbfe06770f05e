"""One conditioning vector per caption from the LLM's features, for vector-conditioned backends (GAN, VAE)."""

from __future__ import annotations

from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead, feature_norm
from text2img.types import Conditioning, TextEmbedding, masked_mean

POOLINGS = ("mean", "last")


class PooledMLP(FusionHead):
    """pool -> norm -> 2-layer MLP, giving `vector` [B, out_dim] only (no tokens: not for cross-attention).

    `pooling="mean"` averages the real tokens, each normalised first so that a few outlier tokens do not
    dominate the mean; `pooling="last"` takes the encoder's pooled state `text.pooled` (the last token's
    with `encoder.pooling=last`, the default of the causal LLMs, whose last token has read the whole caption).
    """

    produces = frozenset({"vector"})

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        pooling: str = "mean",
        hidden_dim: int | None = None,
        norm: str = "layer",
        dropout: float = 0.0,
        layer_mix: str = "none",
        layer_width: int | None = None,
    ) -> None:
        """`hidden_dim` is the MLP's hidden width (None: out_dim)."""
        super().__init__(in_dim, out_dim, layer_mix, layer_width)
        if pooling not in POOLINGS:
            raise ConfigError(f"fusion.pooling={pooling!r} is unknown; use one of: {', '.join(POOLINGS)}")
        # Created only when used, so every parameter of the head is trained.
        self.token_norm = feature_norm(norm, self.text_dim) if pooling == "mean" else None
        self.norm = feature_norm(norm, self.text_dim)
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(self.text_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        if self.token_norm is None:
            pooled = text.pooled
        else:
            pooled = masked_mean(self.token_norm(text.tokens), text.mask)
        return Conditioning(vector=self.mlp(self.norm(pooled)))
