"""Training-time augmentation of captions: word dropout, shuffled comma-separated parts, template variation.

Randomness comes from the `torch.Generator` passed in, or torch's global generator without one (which
`lightning.seed_everything` seeds), so a run's augmentations are reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _caption_generator(seed: int, caption: str) -> torch.Generator:
    """A generator seeded by the caption itself, so a caption's variants do not depend on the other captions
    (adding data leaves the cached variants of existing captions valid)."""
    digest = hashlib.sha256(f"{seed}\n{caption}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class CaptionAugment:
    """Random rewrites of a training caption; all off by default. Validation and test captions are never
    augmented.

    shuffle_parts: probability of shuffling a caption's comma-separated parts ("woman, blond hair" ->
        "blond hair, woman"), which keeps every part.
    word_dropout: probability of dropping each word; one word always survives.
    templates: texts with `{caption}`, one drawn per caption ("an emoji of {caption}"); include "{caption}"
        itself to keep the plain caption among the draws. Empty = off.
    variants: with a frozen encoder, how many augmented versions of each training caption are precomputed
        and cached (training draws one per step); a trainable encoder augments on the fly instead.
    Parts are shuffled first, then words dropped, then the template applied.
    """

    shuffle_parts: float = 0.0
    word_dropout: float = 0.0
    templates: Sequence[str] = ()
    variants: int = 4

    def __post_init__(self) -> None:
        for name in ("shuffle_parts", "word_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.caption_augment.{name}={getattr(self, name)} is a probability; use a value in [0, 1]")
        # Hydra passes a ListConfig: keep a tuple, so the frozen dataclass stays hashable and immutable.
        object.__setattr__(self, "templates", tuple(str(template) for template in self.templates))
        for template in self.templates:
            if "{caption}" not in template:
                raise ValueError(
                    f"data.caption_augment.templates entry {template!r} lacks '{{caption}}'; add it where the caption goes"
                )
        if self.variants < 1:
            raise ValueError(f"data.caption_augment.variants={self.variants} must be at least 1 cached version per caption")

    @property
    def enabled(self) -> bool:
        return self.shuffle_parts > 0 or self.word_dropout > 0 or bool(self.templates)

    def __call__(self, caption: str, generator: torch.Generator | None = None) -> str:
        if not self.enabled:
            return caption
        if self.shuffle_parts > 0 and float(torch.rand((), generator=generator)) < self.shuffle_parts:
            parts = [part.strip() for part in caption.split(",")]
            caption = ", ".join(parts[i] for i in torch.randperm(len(parts), generator=generator).tolist())
        if self.word_dropout > 0:
            caption = self._drop_words(caption, generator)
        if self.templates:
            template = self.templates[int(torch.randint(len(self.templates), (), generator=generator))]
            caption = template.replace("{caption}", caption)
        return caption

    def _drop_words(self, caption: str, generator: torch.Generator | None) -> str:
        words = caption.split()
        if not words:
            return caption
        keep = torch.rand(len(words), generator=generator) >= self.word_dropout
        if not keep.any():
            keep[torch.randint(len(words), (), generator=generator)] = True
        return " ".join(word for word, kept in zip(words, keep.tolist()) if kept)

    def variants_of(self, caption: str, seed: int = 0) -> list[str]:
        """The `variants` augmented versions of `caption`, the same for a given seed in every run."""
        generator = _caption_generator(seed, caption)
        return [self(caption, generator) for _ in range(self.variants)]
