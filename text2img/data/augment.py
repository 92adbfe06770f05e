"""Training-time augmentation of one [3, H, W] image in [-1, 1], in plain torch.

Randomness comes from torch's global generator, so `lightning.seed_everything` (with
`workers=True` for DataLoader workers) makes a run's augmentations reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _luma(x: Tensor) -> Tensor:
    """[1, H, W] grey level of a [3, H, W] RGB image (ITU-R BT.601 weights)."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


@dataclass(frozen=True)
class ImageAugment:
    """Random horizontal flip, random zoom-in crop and colour jitter; all off by default.

    hflip: probability of mirroring left-right.
    random_crop_scale: smallest crop area as a fraction of the image (1.0 = off); a square-ish crop of
        area uniform in [random_crop_scale, 1] at a random position is resized back to H x W.
    color_jitter: strength s in [0, 1]; brightness, contrast and saturation are each scaled by a
        factor drawn uniformly from [1 - s, 1 + s].
    The output has the input's shape and stays in [-1, 1]. With everything off the input is
    returned as is.
    """

    hflip: float = 0.0
    random_crop_scale: float = 1.0
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"data.source.augment.hflip={self.hflip} is a probability; use a value in [0, 1]")
        if not 0.0 < self.random_crop_scale <= 1.0:
            raise ValueError(
                f"data.source.augment.random_crop_scale={self.random_crop_scale} is the smallest crop area fraction; "
                "use a value in (0, 1] (1 = no cropping)"
            )
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ValueError(f"data.source.augment.color_jitter={self.color_jitter} is a strength; use a value in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.hflip > 0 or self.random_crop_scale < 1 or self.color_jitter > 0

    def __call__(self, image: Tensor) -> Tensor:
        if not self.enabled:
            return image
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            image = image.flip(-1)
        if self.random_crop_scale < 1:
            image = self._random_crop(image)
        if self.color_jitter > 0:
            image = self._jitter(image)
        return image

    def _random_crop(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        side = math.sqrt(_uniform(self.random_crop_scale, 1.0))
        crop_h, crop_w = max(1, round(height * side)), max(1, round(width * side))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        crop = image[:, top : top + crop_h, left : left + crop_w]
        # Bilinear weights are convex, so the result stays within the input's range.
        return F.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False)[0]

    def _jitter(self, image: Tensor) -> Tensor:
        s = self.color_jitter
        x = (image + 1) / 2  # jitter is defined on [0, 1] intensities
        x = x * _uniform(1 - s, 1 + s)  # brightness
        mean = _luma(x).mean()
        x = mean + (x - mean) * _uniform(1 - s, 1 + s)  # contrast
        gray = _luma(x)
        x = gray + (x - gray) * _uniform(1 - s, 1 + s)  # saturation
        return x.clamp(0, 1) * 2 - 1
