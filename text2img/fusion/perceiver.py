"""A Perceiver resampler: a fixed number of learned queries read the LLM tokens by cross-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead, feature_norm
from text2img.types import Conditioning, TextEmbedding


class AdaLayerNorm(nn.LayerNorm):
    """A LayerNorm; with `time_dim` set, its output is then scaled by (1 + scale) and shifted by a per-channel
    (scale, shift) predicted from a timestep embedding (SiLU -> Linear), as in ELLA's connector.

    The prediction is zero-initialised: a modulated norm starts as the plain one with the same weights. It is a
    LayerNorm subclass so that the plain resampler's parameter names (and checkpoints) are unchanged.
    """

    def __init__(self, dim: int, time_dim: int | None = None) -> None:
        super().__init__(dim)
        self.modulation = None
        if time_dim is not None:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim))
            nn.init.zeros_(self.modulation[-1].weight)
            nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: Tensor, time: Tensor | None = None) -> Tensor:
        """x [B, N, dim]; time [B, time_dim], the timestep embedding (required when modulated)."""
        x = super().forward(x)
        if self.modulation is None:
            return x
        scale, shift = self.modulation(time)[:, None].chunk(2, dim=-1)
        return x * (1 + scale) + shift


class LatentCrossAttention(nn.Module):
    """Multi-head attention of the latents over [tokens; latents], padding tokens masked out.

    As in Flamingo and IP-Adapter, the latents are keys and values too: every query has something to
    attend to even when a caption has no real token (softmax over nothing would give NaN).
    """

    def __init__(self, dim: int, heads: int, time_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm_tokens = AdaLayerNorm(dim, time_dim)
        self.norm_latents = AdaLayerNorm(dim, time_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def split_heads(self, x: Tensor) -> Tensor:
        """[B, N, dim] -> [B, heads, N, dim / heads]."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, latents: Tensor, tokens: Tensor, mask: Tensor, time: Tensor | None = None) -> Tensor:
        latents = self.norm_latents(latents, time)
        context = torch.cat([self.norm_tokens(tokens, time), latents], dim=1)
        keep = torch.cat([mask, mask.new_ones(latents.shape[:2])], dim=1)  # [B, L + N], True = attend
        q = self.split_heads(self.to_q(latents))
        k, v = (self.split_heads(x) for x in self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverBlock(nn.Module):
    """Pre-norm residual block: cross-attention to the tokens, then an MLP; every norm timestep-modulated when
    `time_dim` is set."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, time_dim: int | None = None) -> None:
        super().__init__()
        self.attention = LatentCrossAttention(dim, heads, time_dim)
        self.mlp = nn.Sequential(
            AdaLayerNorm(dim, time_dim), nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, latents: Tensor, tokens: Tensor, mask: Tensor, time: Tensor | None = None) -> Tensor:
        latents = latents + self.attention(latents, tokens, mask, time)
        # The norm stays the MLP's first layer (parameter names of earlier checkpoints); it alone takes `time`.
        return latents + self.mlp[1:](self.mlp[0](latents, time))


class PerceiverResampler(FusionHead):
    """Flamingo / IP-Adapter-style resampler: `num_latents` learned queries, `depth` blocks of cross-attention
    to the (normed, projected) LLM tokens + MLP, giving `tokens` [B, num_latents, out_dim] whatever the
    caption length (all attended), and `vector`, their mean.

    It works at width out_dim throughout: the tokens are projected in once, so cost does not grow with the
    LLM's width.

    `time_dim` is for `TimestepAwarePerceiver`: the width of the timestep embedding that modulates every
    LayerNorm of the blocks and the output (None: plain LayerNorms).
    """

    produces = frozenset({"tokens", "vector"})

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 16,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: int = 4,
        norm: str = "layer",
        layer_mix: str = "none",
        layer_width: int | None = None,
        *,
        time_dim: int | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim, layer_mix, layer_width)
        if out_dim % heads:
            raise ConfigError(
                f"fusion.heads={heads} does not divide fusion.out_dim={out_dim}; choose heads that divide it"
            )
        self.norm = feature_norm(norm, self.text_dim)
        self.proj = nn.Linear(self.text_dim, out_dim)
        # Small start, like the token embeddings of a transformer: the first blocks see near-uniform queries.
        self.latents = nn.Parameter(torch.randn(num_latents, out_dim) * 0.02)
        self.blocks = nn.ModuleList(PerceiverBlock(out_dim, heads, mlp_ratio, time_dim) for _ in range(depth))
        self.norm_out = AdaLayerNorm(out_dim, time_dim)

    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        return self.resample(text)

    def resample(self, text: TextEmbedding, time: Tensor | None = None) -> Conditioning:
        """The head's output; `time` [B, time_dim] is the timestep embedding of a timestep-aware subclass."""
        tokens = self.proj(self.norm(text.tokens))
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, tokens, text.mask, time)
        latents = self.norm_out(latents, time)
        mask = text.mask.new_ones(latents.shape[:2])
        return Conditioning(tokens=latents, mask=mask, vector=latents.mean(1))
