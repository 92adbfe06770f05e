"""The networks a diffusion generator trains, behind one call: `(x, t, tokens, mask, vector) -> prediction`.

`DiffusionGenerator` builds its denoiser from config (`generator.denoiser`, conf/generator/denoiser/) with the space
diffusion runs in, and never looks inside it: a UNet (`UNetDenoiser`) and a diffusion transformer (`DiTDenoiser`)
train, sample, edit and export through the same generator, in pixel space and in a first stage's latents alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from diffusers import ModelMixin, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.sampling import runtime

__all__ = ["DiTDenoiser", "Denoiser", "UNetDenoiser"]


class Denoiser(nn.Module, ABC):
    """A diffusers network with cross-attention on the fused text tokens, predicting for x [B, C, S, S] at timesteps
    t [B] what the generator's objective asks (noise, velocity).

    Built by the generator (`generator.denoiser` is a partial) for a space of `channels` x `size` x `size`, text
    tokens of `cond_dim` features, `patch_size` (p x p positions become one, how each network does it is its own),
    and `time_vector`: whether the fusion head's vector [B, cond_dim] is added to the timestep embedding (then
    `forward` gets it, else None). `folder` is the network's name in diffusers pipelines, the export's subfolder
    it is saved to (`network`, LoRA merged); `vector_embedding` the time vector's projection where it is not part
    of the network (the export saves it beside it).
    """

    folder: ClassVar[str]
    # blocks that can each read their own token set (deep fusion), None where the network has no such blocks
    text_blocks: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.vector_embedding: nn.Module | None = None

    @property
    @abstractmethod
    def network(self) -> ModelMixin:
        """The diffusers model (what the export saves to `folder`)."""

    @abstractmethod
    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, vector: Tensor | None) -> Tensor:
        """The prediction for x at t, cross-attending to `tokens` [B, L, cond_dim] where `mask` [B, L] is True."""


class UNetDenoiser(Denoiser):
    """A diffusers `UNet2DConditionModel` on p x p pixel patches folded into channels (`pixel_unshuffle`): it runs
    at a p²-times cheaper resolution, which is what makes 32-px training affordable on a CPU. The vector path is
    diffusers' projection class embedding (Linear -> SiLU -> Linear of `class_labels` added to the timestep
    embedding), as SDXL and Imagen add pooled text."""

    folder = "unet"

    def __init__(
        self,
        unet: Callable[..., UNet2DConditionModel],
        channels: int,
        size: int,
        cond_dim: int,
        patch_size: int,
        time_vector: bool,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        folded = channels * patch_size**2
        class_embedding = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": cond_dim}
        self.unet = unet(
            sample_size=size // patch_size, in_channels=folded, out_channels=folded, cross_attention_dim=cond_dim,
            **(class_embedding if time_vector else {}),
        )
        levels = len(self.unet.config.down_block_types)
        multiple = 2 ** (levels - 1) * patch_size
        if size % multiple:
            raise ConfigError(
                f"a {levels}-level UNet with patch_size {patch_size} cannot halve the diffusion space "
                f"({channels}x{size}x{size}: the images, or a first stage's latents) {levels - 1} times: its side must "
                f"be a multiple of {multiple}; use fewer "
                "generator.denoiser.unet.block_out_channels, a larger image size or a first stage that downsamples less"
            )

    @property
    def network(self) -> UNet2DConditionModel:
        return self.unet

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, vector: Tensor | None) -> Tensor:
        return runtime.unet_prediction(self.unet, x, t, tokens, mask, vector, self.patch_size)


class DiTDenoiser(Denoiser):
    """A diffusion transformer (DiT) of diffusers, `depth` blocks of `width` features in `heads` heads over the
    space's p x p patches (`patch_size`: the transformer's own patch embedding), each block cross-attending to the
    fused tokens with their mask and modulated by the timestep (adaLN-single).

    `transformer` is a diffusers DiT class taking PixArt's arguments (`PixArtTransformer2DModel`, see
    conf/generator/denoiser/dit.yaml for why that one). Its only timestep-side input besides t is PixArt's
    resolution/aspect-ratio embedding of scalars, no place for a text vector; so `time_vector` adds one:
    `vector_embedding` (Linear -> SiLU -> Linear, what the UNet's projection class embedding is) maps the vector
    into the timestep embedding (`runtime.transformer_prediction`).
    """

    folder = "transformer"

    def __init__(
        self,
        transformer: Callable[..., PixArtTransformer2DModel],
        depth: int,
        width: int,
        heads: int,
        channels: int,
        size: int,
        cond_dim: int,
        patch_size: int,
        time_vector: bool,
    ) -> None:
        super().__init__()
        if width % heads:
            divisors = ", ".join(str(h) for h in range(1, width + 1) if width % h == 0)
            raise ConfigError(
                f"generator.denoiser.width={width} does not split into generator.denoiser.heads={heads} heads; "
                f"use heads in {divisors} or a width that is a multiple of {heads}"
            )
        self.transformer = transformer(
            num_layers=depth, num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
            out_channels=channels, sample_size=size, patch_size=patch_size, cross_attention_dim=cond_dim,
        )
        self.vector_embedding = TimestepEmbedding(cond_dim, width) if time_vector else None
        self.text_blocks = depth

    @property
    def network(self) -> PixArtTransformer2DModel:
        return self.transformer

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, vector: Tensor | None) -> Tensor:
        return runtime.transformer_prediction(self.transformer, x, t, tokens, mask, self.vector_embedding, vector)
