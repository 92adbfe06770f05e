"""The dataset and source contracts every image-caption data set follows.

A *source* owns one collection of captioned images (OpenMoji, an image folder...) and hands out its
three splits as `ImageCaptionDataset`s. Augmentation is the source's business: it is given an
`augment` callable and applies it to the "train" split only, so val/test images are never augmented
whatever the caller does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from text2img.data.splits import SPLITS, check_fractions, split_indices

Transform = Callable[[Tensor], Tensor]


class Unusable(Exception):
    """A sample a source skips (or, when strict, refuses); `reason`, a short phrase such as "empty caption",
    is the key its skips are counted under, and the message adds the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def uint8_to_tensor(image: np.ndarray) -> Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [-1, 1], the layout every generator consumes."""
    # np.array copies: PIL-backed arrays are read-only, which torch.from_numpy warns about.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageCaptionDataset(Dataset[tuple[Tensor, str]], ABC):
    """Items are (image [3, H, W] float32 in [-1, 1], caption).

    `captions` lists every item's caption without touching an image, so text embeddings can be
    pre-computed before training starts.
    """

    def __init__(self, captions: Sequence[str], transform: Transform | None = None) -> None:
        self._captions = list(captions)
        self.transform = transform

    @property
    def captions(self) -> list[str]:
        return self._captions

    def __len__(self) -> int:
        return len(self._captions)

    @abstractmethod
    def load_image(self, index: int) -> Tensor:
        """The un-augmented image of item `index`, [3, H, W] float32 in [-1, 1]."""

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self._captions[index]


class ArrayImageDataset(ImageCaptionDataset):
    """Images held in memory as one uint8 array [N, H, W, 3] (small rendered or packaged sets)."""

    def __init__(
        self, images: np.ndarray, captions: Sequence[str], transform: Transform | None = None
    ) -> None:
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[-1] != 3
            or len(images) != len(captions)
        ):
            raise ValueError(
                f"images must be uint8 [N, H, W, 3] with one caption each; got {images.dtype} {images.shape} "
                f"for {len(captions)} captions"
            )
        super().__init__(captions, transform)
        self.images = images

    def load_image(self, index: int) -> Tensor:
        return uint8_to_tensor(self.images[index])


class ImageCaptionSource(ABC):
    """One collection of captioned images, split deterministically by caption (see `splits.py`).

    Subclasses provide `captions` (every usable sample, in a fixed order) and `_subset`; this class
    turns a split name into indices and gives the `augment` transform to "train" alone.
    """

    def __init__(
        self,
        image_size: int,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        augment: Transform | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"data.source.image_size={image_size} must be a positive number of pixels, e.g. 32")
        check_fractions(val_fraction, test_fraction)
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.augment = augment

    @property
    @abstractmethod
    def captions(self) -> list[str]:
        """Captions of all usable samples, in the order `_subset` indices refer to."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """Names the images, captions and splits: it changes whenever any of them would.

        Cached statistics and evaluators derived from the data (real-image features, the alignment
        evaluator) are keyed by it, so they are reused across runs and sweeps and never go stale.
        """

    def _split_identity(self) -> str:
        """The part of `identity` every source shares: the split fractions."""
        return f"val{self.val_fraction}-test{self.test_fraction}"

    @abstractmethod
    def _subset(self, indices: list[int], transform: Transform | None) -> ImageCaptionDataset:
        """A dataset of the samples at `indices`."""

    @cached_property
    def split_indices(self) -> dict[str, list[int]]:
        return split_indices(self.captions, self.val_fraction, self.test_fraction)

    def split(self, name: str, augmented: bool = True) -> ImageCaptionDataset:
        """The "train", "val" or "test" split; only "train" is augmented, and only when `augmented`
        (statistics of the real data are taken on the images as they are)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return self._subset(self.split_indices[name], self.augment if name == "train" and augmented else None)

    def __len__(self) -> int:
        return len(self.captions)
