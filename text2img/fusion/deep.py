"""Deep fusion: each block of a diffusion transformer cross-attends to its own LLM layer (HiDream-I1, Playground v3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead, feature_norm
from text2img.types import Conditioning, TextEmbedding, masked_mean


def evenly_spaced(layers: int, blocks: int) -> list[int]:
    """Which of `layers` each of `blocks` reads: the first block the first layer, the last the last, evenly between."""
    if blocks == 1:
        return [layers - 1]
    return [round(block * (layers - 1) / (blocks - 1)) for block in range(blocks)]


class DeepFusion(FusionHead):
    """Routes the encoder's layers into the denoiser's blocks: block i reads layer `block_layers[i]` of the layers
    the encoder concatenated (`encoder.layers=[...] encoder.combine=concat`: `in_dim` = layers x `layer_width`),
    through its own norm and linear map to `out_dim`.

    Its tokens are the blocks' token sets side by side on the feature axis, [B, L, blocks x out_dim], so guidance,
    batching and the export carry them as one tensor; a diffusion transformer with `blocks` blocks gives each block
    its slice (`runtime.transformer_prediction`). `block_layers` None spreads the blocks evenly over the layers
    (first block: first layer read, last block: last). The vector is the mean of the last block's real tokens.
    """

    produces = frozenset({"tokens", "vector"})

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        layer_width: int,
        blocks: int | None,
        block_layers: list[int] | None = None,
        norm: str = "layer",
    ) -> None:
        super().__init__(in_dim, out_dim)
        if in_dim % layer_width:
            raise ConfigError(
                f"fusion.in_dim={in_dim} is not a whole number of layers of fusion.layer_width={layer_width}; "
                "leave both at their defaults (encoder.features, encoder.hidden_size)"
            )
        self.layers = in_dim // layer_width
        self.layer_width = layer_width
        # None: the generator has no blocks to route into; the pairing check says so, naming both options.
        self.text_blocks = blocks or 0
        if block_layers is None:
            block_layers = evenly_spaced(self.layers, self.text_blocks) if self.text_blocks else []
        block_layers = list(block_layers)
        if len(block_layers) != self.text_blocks or not all(0 <= layer < self.layers for layer in block_layers):
            raise ConfigError(
                f"fusion.block_layers={block_layers} must give each of the {self.text_blocks} blocks one of the "
                f"{self.layers} layers the encoder reads (0 to {self.layers - 1}); or set it to null: evenly spaced"
            )
        self.block_layers = block_layers
        self.norms = nn.ModuleList(feature_norm(norm, layer_width) for _ in block_layers)
        self.projections = nn.ModuleList(nn.Linear(layer_width, out_dim) for _ in block_layers)

    def forward(self, text: TextEmbedding, timestep: Tensor | None = None) -> Conditioning:
        layers = text.tokens.unflatten(-1, (self.layers, self.layer_width))
        keep = text.mask.unsqueeze(-1)
        per_block = [
            projection(norm(layers[..., layer, :])) * keep
            for layer, norm, projection in zip(self.block_layers, self.norms, self.projections)
        ]
        return Conditioning(tokens=torch.cat(per_block, dim=-1), mask=text.mask, vector=masked_mean(per_block[-1], text.mask))
