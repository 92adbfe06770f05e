"""Where each text token looks: per-token cross-attention maps over the image, recorded during one generation.

The generator's cross-attention layers are wrapped for the length of one `model.generate` call: every call
of a layer adds its attention probabilities (softmax over the conditioning tokens, averaged over heads) to a
running sum, per resolution. The result is the mean over layers and sampling steps, upsampled to the image.
Backends: `diffusion`, `dit` and `ldm` (the cross-attention layers of the diffusers UNet or diffusion transformer:
the DiT's positions are its patches, a square grid too), and `gan` with `generator.attention=true` (its one
`TokenCrossAttention`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from text2img.encoders.base import TextEncoder
from text2img.encoders.hf import HFTextEncoder
from text2img.errors import ConfigError
from text2img.fusion.token_projection import TokenProjection
from text2img.generators.diffusion import DiffusionGenerator
from text2img.generators.gan import GANGenerator
from text2img.generators.gan_blocks import TokenCrossAttention
from text2img.lightning import Text2ImgModule


@dataclass
class CrossAttentionMaps:
    """One generated image and where each conditioning token was attended from.

    prompt:       the prompt as given
    encoder_text: what the text encoder read for it (its expansion, with prompt expansion)
    tokens:       one label per conditioning token: the encoder's tokens as text with a per-token fusion head
                  (`token_projection`), "latent <i>" for a head that resamples them to learned latents
    maps:         [tokens, H, W] at image resolution: at each pixel, the share of attention each token received
                  (they sum to 1 over tokens), averaged over heads, layers and sampling steps
    image:        [3, H, W] in [0, 1]
    """

    prompt: str
    encoder_text: str
    tokens: list[str]
    maps: Tensor
    image: Tensor


class AttentionSum:
    """Running sums of attention probabilities [rows, queries, keys], one per query count (resolution)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows  # the leading batch rows to keep: the conditional half of a guided batch
        self.sums: dict[int, Tensor] = {}
        self.calls = 0

    def add(self, probabilities: Tensor) -> None:
        kept = probabilities[: self.rows].detach().float()
        queries = kept.shape[1]
        self.sums[queries] = self.sums[queries] + kept if queries in self.sums else kept
        self.calls += 1

    def mean_maps(self, height: int, width: int) -> Tensor:
        """[rows, keys, height, width]: the mean over every recorded call, each upsampled from its square grid."""
        if not self.calls:
            raise RuntimeError("no cross-attention layer ran during generation; nothing was recorded")
        total = 0.0
        for queries, summed in self.sums.items():
            side = math.isqrt(queries)
            if side * side != queries:
                raise ValueError(f"a cross-attention layer saw {queries} positions, not a square grid")
            grid = summed.transpose(1, 2).reshape(self.rows, -1, side, side)
            # Bilinear weights sum to 1, so the maps still sum to 1 over tokens at every pixel.
            total = total + F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        return total / self.calls


class RecordingAttnProcessor:
    """A diffusers attention processor that hands the layer's attention probabilities to `recorded` and then
    runs the layer's own processor, so the layer's output is unchanged."""

    def __init__(self, processor: Any, recorded: AttentionSum) -> None:
        self.processor = processor
        self.recorded = recorded

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        self.recorded.add(diffusers_attention_probabilities(attn, hidden_states, encoder_hidden_states, attention_mask))
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def diffusers_attention_probabilities(
    attn: Attention, hidden_states: Tensor, context: Tensor, attention_mask: Tensor | None
) -> Tensor:
    """[B, queries, keys] softmax probabilities of a diffusers cross-attention layer, averaged over heads, computed
    as diffusers' reference `AttnProcessor` does (the fused kernels never materialise them)."""
    batch = hidden_states.shape[0]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    probabilities = attn.get_attention_scores(query, key, mask)  # [B * heads, queries, keys]
    return probabilities.view(batch, attn.heads, *probabilities.shape[1:]).mean(1)


@contextmanager
def recording_cross_attention(generator: nn.Module, recorded: AttentionSum) -> Iterator[None]:
    """Record every cross-attention call of `generator` into `recorded` while the block runs; the layers are
    restored afterwards, also on errors."""
    if isinstance(generator, DiffusionGenerator):
        layers = [m for m in generator.denoiser.modules() if isinstance(m, Attention) and m.is_cross_attention]
        originals = [layer.processor for layer in layers]
        for layer in layers:
            layer.set_processor(RecordingAttnProcessor(layer.processor, recorded))
        try:
            yield
        finally:
            for layer, processor in zip(layers, originals, strict=True):
                layer.set_processor(processor)
        return
    layers = [m for m in generator.modules() if isinstance(m, TokenCrossAttention)]
    if not layers:
        detail = " without generator.attention=true" if isinstance(generator, GANGenerator) else ""
        raise ConfigError(
            f"{type(generator).__name__}{detail} has no cross-attention on text tokens; attention maps exist for "
            "generator=diffusion, generator=dit, generator=ldm and generator=gan with generator.attention=true"
        )

    def record(layer: TokenCrossAttention, args: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        # The layer asks for no weights (need_weights=False is faster); recompute them from its inputs.
        x, tokens, mask = args
        query = layer.norm(x).flatten(2).transpose(1, 2)
        _, weights = layer.attention(query, tokens, tokens, key_padding_mask=~mask, need_weights=True)
        recorded.add(weights)  # averaged over heads by default

    hooks = [layer.register_forward_hook(record) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def token_labels(encoder: TextEncoder, text: str, count: int) -> list[str]:
    """The `count` tokens the encoder read for `text`, each decoded on its own ("token <i>" for an encoder that
    is not a transformers model: there is no tokenizer to ask)."""
    if not isinstance(encoder, HFTextEncoder):
        return [f"token {i}" for i in range(count)]
    ids = encoder.token_ids(text)  # loads the model: the tokenizer comes with it; a frozen one is unloaded below
    assert encoder.tokenizer is not None
    labels = [encoder.tokenizer.decode([i]) for i in ids]
    encoder.unload()
    if len(labels) != count:
        raise RuntimeError(f"the tokenizer gives {len(labels)} tokens for {text!r} but the embedding has {count}")
    return labels


@torch.no_grad()
def cross_attention_maps(
    model: Text2ImgModule,
    prompt: str,
    seed: int = 0,
    guidance_scale: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
) -> CrossAttentionMaps:
    """Generate the image of `prompt` with `seed` (the one `text2img.sample` draws, bit for bit) and record each
    conditioning token's cross-attention map; `guidance_scale`, `steps` and `sampler` default to the checkpoint
    generator's."""
    encoded = model.conditioner.sampling([prompt])
    encoder_texts, text = encoded.texts, encoded.text.to(model.device)
    recorded = AttentionSum(rows=1)  # row 0 of the generation chunk: the prompt, not the chunk's filling copies
    with recording_cross_attention(model.generator, recorded):
        image = model.generate(text, [seed], guidance_scale=guidance_scale, steps=steps, sampler=sampler)[0].cpu()
    maps = recorded.mean_maps(*image.shape[1:])[0].cpu()
    if isinstance(model.fusion, TokenProjection):
        maps = maps[: int(text.mask[0].sum())]  # the prompt's tokens; padding is never attended
        tokens = token_labels(model.conditioner.text_encoder, encoder_texts[0], len(maps))
    else:
        tokens = [f"latent {i}" for i in range(len(maps))]
    return CrossAttentionMaps(prompt, encoder_texts[0], tokens, maps, image)
