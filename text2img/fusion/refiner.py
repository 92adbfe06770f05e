"""A context refiner: bidirectional transformer blocks over the projected LLM tokens (Lumina-Image 2.0)."""

from __future__ import annotations

import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead, embed_timestep, feature_norm
from text2img.fusion.perceiver import AdaLayerNorm
from text2img.types import Conditioning, TextEmbedding, masked_mean


class RefinerBlock(nn.Module):
    """Pre-norm residual block: masked self-attention over the tokens, then an MLP. Both residual branches end in a
    zero-initialised linear, so a new block is the identity; with `time_dim`, the timestep modulates both norms."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, time_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attention = AdaLayerNorm(dim, time_dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_mlp = AdaLayerNorm(dim, time_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        for layer in (self.to_out, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor, mask: Tensor, time: Tensor | None = None) -> Tensor:
        """tokens [B, L, dim]; mask [B, L] bool, True for real tokens (every row has one); time [B, time_dim]."""
        q, k, v = (
            part.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for part in self.to_qkv(self.norm_attention(tokens, time)).chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        tokens = tokens + self.to_out(attended.transpose(1, 2).flatten(2))
        return tokens + self.mlp(self.norm_mlp(tokens, time))


class TokenRefiner(FusionHead):
    """norm -> linear to out_dim -> `depth` bidirectional transformer blocks over the real tokens -> tokens.

    A causal LLM's token i has read tokens 0..i only; the refiner lets every token read the whole caption before
    the generator cross-attends to it, as Lumina-Image 2.0's context refiner does (2 blocks, no timestep), and as
    LI-DiT argues a causal encoder needs. Its blocks start as the identity, so a new refiner is `TokenProjection`
    with the same norm and linear. With `timestep_conditioned` (ELLA-style) the diffusion timestep modulates every
    norm of the blocks; the modulation starts at zero too. No position embedding is added: an LLM's hidden states
    already carry their positions. The vector is the mean of the refined real tokens.
    """

    produces = frozenset({"tokens", "vector"})

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: int = 4,
        norm: str = "layer",
        timestep_conditioned: bool = False,
        time_channels: int = 128,
        layer_mix: str = "none",
        layer_width: int | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim, layer_mix, layer_width)
        if out_dim % heads:
            raise ConfigError(f"fusion.heads={heads} does not divide fusion.out_dim={out_dim}; choose heads that divide it")
        self.timestep_aware = timestep_conditioned
        self.norm = feature_norm(norm, self.text_dim)
        self.proj = nn.Linear(self.text_dim, out_dim)
        time_dim = out_dim if timestep_conditioned else None
        self.blocks = nn.ModuleList(RefinerBlock(out_dim, heads, mlp_ratio, time_dim) for _ in range(depth))
        if timestep_conditioned:
            # diffusers' embedding of UNet2DConditionModel, as the timestep-aware perceiver uses
            self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(time_channels, out_dim)

    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        time = None
        if self.timestep_aware:
            if timestep is None:
                raise ValueError("fusion.timestep_conditioned=true needs the diffusion timestep; call the head with it")
            time = embed_timestep(self.time_proj, self.time_embedding, timestep, text.tokens)
        tokens = self.proj(self.norm(text.tokens))
        for block in self.blocks:
            tokens = block(tokens, text.mask, time)
        tokens = tokens * text.mask.unsqueeze(-1)
        return Conditioning(tokens=tokens, mask=text.mask, vector=masked_mean(tokens, text.mask))
