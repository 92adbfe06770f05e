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
from text2img.generators.pretrained import load_network
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

    `source` (and `subfolder`) load a pretrained network instead of building one (a diffusers folder or hub name,
    e.g. a Stable Diffusion 1.5 pipeline's unet/): its own config then sets its architecture, and its sizes must
    match the space (`pretrained_checks`). `freeze` keeps its weights fixed (LoRA, generator_peft=lora, may then
    adapt them): only the fusion head trains, as in ELLA or LaVi-Bridge, and checkpoints leave the frozen weights
    out (they reload from `source`).
    """

    folder: ClassVar[str]
    # blocks that can each read their own token set (deep fusion), None where the network has no such blocks
    text_blocks: int | None = None

    def __init__(self, source: str | None = None, subfolder: str | None = None, freeze: bool = False) -> None:
        super().__init__()
        self.vector_embedding: nn.Module | None = None
        self.source = source
        self.subfolder = subfolder
        self.freeze = freeze

    def pretrained_checks(self, in_channels: int, cross_attention_dim: int, channels: int, cond_dim: int) -> None:
        """One line when a loaded network does not fit the diffusion space or the fusion head's width."""
        where = f"generator.denoiser.source={self.source}" + (f" (subfolder {self.subfolder})" if self.subfolder else "")
        if in_channels != channels:
            raise ConfigError(
                f"{where} takes {in_channels} input channels but the diffusion space has {channels}; use the first "
                "stage it was trained with (generator.first_stage.source, subfolder=vae) and generator.patch_size=1"
            )
        if cross_attention_dim != cond_dim:
            raise ConfigError(
                f"{where} cross-attends to {cross_attention_dim} features but generator.cond_dim={cond_dim}; set "
                f"generator.cond_dim={cross_attention_dim} (experiment=adapt_pretrained reads it from the folder)"
            )

    def _frozen(self) -> None:
        if self.freeze:
            self.network.requires_grad_(False)

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
        source: str | None = None,
        subfolder: str | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__(source, subfolder, freeze)
        self.patch_size = patch_size
        folded = channels * patch_size**2
        class_embedding = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": cond_dim}
        if source is None:
            self.unet = unet(
                sample_size=size // patch_size, in_channels=folded, out_channels=folded, cross_attention_dim=cond_dim,
                **(class_embedding if time_vector else {}),
            )
        else:
            self.unet = load_network(UNet2DConditionModel, source, subfolder)
            self.pretrained_checks(self.unet.config.in_channels, self.unet.config.cross_attention_dim, folded, cond_dim)
            if time_vector and self.unet.config.class_embed_type != "projection":
                raise ConfigError(
                    f"generator.time_vector=true adds the text vector through a projection class embedding, which "
                    f"generator.denoiser.source={source} has none of; set generator.time_vector=false"
                )
        self._frozen()
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
        source: str | None = None,
        subfolder: str | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__(source, subfolder, freeze)
        if source is not None:
            self.transformer = load_network(getattr(transformer, "func", transformer), source, subfolder)
            config = self.transformer.config
            width = config.num_attention_heads * config.attention_head_dim
            # PixArt-alpha's own projection maps its text encoder's features (T5: 4,096) to the blocks' width.
            text_width = getattr(config, "caption_channels", None) or config.cross_attention_dim
            self.pretrained_checks(config.in_channels, text_width, channels, cond_dim)
            self.vector_embedding = TimestepEmbedding(cond_dim, width) if time_vector else None
            self.text_blocks = config.num_layers
            self._frozen()
            return
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
        self._frozen()

    @property
    def network(self) -> PixArtTransformer2DModel:
        return self.transformer

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, vector: Tensor | None) -> Tensor:
        return runtime.transformer_prediction(self.transformer, x, t, tokens, mask, self.vector_embedding, vector)
