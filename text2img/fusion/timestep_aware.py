"""ELLA's Timestep-aware Semantic Connector: a Perceiver resampler whose LayerNorms the timestep modulates."""

from __future__ import annotations

from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor

from text2img.fusion.base import embed_timestep
from text2img.fusion.perceiver import PerceiverResampler
from text2img.types import Conditioning, TextEmbedding


class TimestepAwarePerceiver(PerceiverResampler):
    """`PerceiverResampler` whose LayerNorms are AdaLayerNorms driven by the diffusion timestep (Hu et al. 2024,
    "ELLA"): the conditioning can differ between early (layout) and late (detail) denoising steps.

    timestep -> sinusoidal embedding (`time_channels`) -> MLP (`time_dim`) -> per norm SiLU -> Linear -> scale,
    shift. The per-norm Linears start at zero, so at step 0 the head equals the plain resampler with the same
    weights: training starts from the plain head.
    """

    timestep_aware = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 16,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: int = 4,
        norm: str = "layer",
        time_channels: int = 128,
        time_dim: int | None = None,
        layer_mix: str = "none",
        layer_width: int | None = None,
    ) -> None:
        """`time_dim` is the timestep embedding's width (None: out_dim)."""
        time_dim = out_dim if time_dim is None else time_dim
        super().__init__(
            in_dim, out_dim, num_latents, depth, heads, mlp_ratio, norm, layer_mix, layer_width, time_dim=time_dim
        )
        # diffusers' own embedding of UNet2DConditionModel (flip_sin_to_cos, no frequency shift), as ELLA uses
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, time_dim)

    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        """`timestep`: [B] or a scalar, any dtype of the sampler's timesteps (int64 or float)."""
        if timestep is None:
            raise ValueError("TimestepAwarePerceiver needs the diffusion timestep; call it with the denoising step's")
        return self.resample(text, embed_timestep(self.time_proj, self.time_embedding, timestep, text.tokens))
