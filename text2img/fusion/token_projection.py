"""Per-token projection of LLM hidden states into the generator's cross-attention space."""

from __future__ import annotations

from torch import Tensor, nn

from text2img.fusion.base import FusionHead, feature_norm
from text2img.types import Conditioning, TextEmbedding, masked_mean


class TokenProjection(FusionHead):
    """norm -> linear (or a 2-layer MLP when `hidden_dim` is set), applied to every token.

    Padding positions stay zero and keep their mask, so the generator ignores them. The vector, for
    backends conditioned by one (FiLM in a GAN or VAE), is the mean of the projected real tokens: it
    adds no parameters that a token-only backend would leave unused.
    """

    produces = frozenset({"tokens", "vector"})

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        norm: str = "layer",
        dropout: float = 0.0,
        layer_mix: str = "none",
        layer_width: int | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim, layer_mix, layer_width)
        self.norm = feature_norm(norm, self.text_dim)
        if hidden_dim is None:
            self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.text_dim, out_dim))
        else:
            self.proj = nn.Sequential(
                nn.Linear(self.text_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
            )

    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        tokens = self.proj(self.norm(text.tokens)) * text.mask.unsqueeze(-1)
        return Conditioning(tokens=tokens, mask=text.mask, vector=masked_mean(tokens, text.mask))
