"""Typed records that flow between the text encoder, the fusion head and the generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """[B, L, D] -> [B, D], the mean over the real tokens (mask True) only."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


@dataclass
class TextEmbedding:
    """What a text encoder returns for a batch of captions.

    tokens: [B, L, D_text] hidden states (zero where mask is False)
    mask:   [B, L] bool, True for real tokens
    pooled: [B, D_text] one vector per caption
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> TextEmbedding:
        return TextEmbedding(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbedding:
        """Move to a device; `dtype` applies to the float tensors only (the mask stays bool)."""
        return TextEmbedding(
            self.tokens.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )

    def trimmed(self) -> TextEmbedding:
        """Drop trailing columns that are padding in every row (cheaper cross-attention)."""
        length = max(int(self.mask.sum(1).max()), 1)
        return TextEmbedding(self.tokens[:, :length], self.mask[:, :length], self.pooled)

    def padded_to(self, length: int) -> TextEmbedding:
        """Right-padded (zero tokens, mask False) to `length` token columns."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"text of {self.tokens.shape[1]} token columns cannot be padded to {length}")
        pad = torch.nn.functional.pad
        return TextEmbedding(pad(self.tokens, (0, 0, 0, extra)), pad(self.mask, (0, extra)), self.pooled)

    @staticmethod
    def cat(parts: list[TextEmbedding]) -> TextEmbedding:
        """Concatenate along the batch, right-padding token sequences to the longest."""
        length = max(p.tokens.shape[1] for p in parts)
        padded = [p.padded_to(length) for p in parts]
        return TextEmbedding(
            torch.cat([p.tokens for p in padded]),
            torch.cat([p.mask for p in padded]),
            torch.cat([p.pooled for p in padded]),
        )


@dataclass
class Conditioning:
    """What a fusion head hands the generator.

    tokens: [B, L', D_cond] for cross-attention, or None
    mask:   [B, L'] bool, or None
    vector: [B, D_vec] for vector conditioning (time-embedding add, FiLM), or None
    film:   one (scale, shift) pair, each [B, C_i], per FiLM layer of the generator (its `film_channels`,
            in order), or None
    """

    tokens: Tensor | None = None
    mask: Tensor | None = None
    vector: Tensor | None = None
    film: tuple[tuple[Tensor, Tensor], ...] | None = None


@dataclass
class Batch:
    """One training or evaluation batch, as the data module serves it: images and captions, no text embeddings (the
    LightningModule's `TextConditioner` turns captions into those).

    images:        [B, 3, H, W] float in [-1, 1]
    captions:      the original captions (for the conditioner, grids, metrics and logging)
    keys:          [B] int64 position in an evaluation set (see EvalOutputs.keys)
    latents:       [B, 2C, h, w] cached posterior (mean, log-variance) of a frozen first stage, for latent backends
    caption_draws: each training item's draw in [0, `TextConditioner.caption_draws`), made by the data loader from
                   torch's generator: which cached variant of its caption the encoder reads, or the seed of its
                   augmentation; None: no draw (the caption's one text). Python ints: they stay on the host, so
                   reading them in a step never waits for a device
    """

    images: Tensor
    captions: list[str]
    keys: Tensor | None = None
    latents: Tensor | None = None
    caption_draws: list[int] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class EvalOutputs:
    """What validation and test steps hand the evaluation callbacks.

    images:          generated [B, 3, H, W] float in [0, 1]
    real:            the prompts' real images [B, 3, H, W] float in [0, 1]
    captions:        the prompts
    text:            their embeddings
    keys:            [B] int64, each sample's position in the evaluation set. Sampling noise and the
                     metrics' random choices depend on the key alone, so figures do not depend on
                     batch size or on how samples are spread over DDP processes.
    reconstructions: [B, 3, H, W] in [0, 1] for backends that reconstruct their input, else None
    """

    images: Tensor
    real: Tensor
    captions: list[str]
    text: TextEmbedding
    keys: Tensor
    reconstructions: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]
