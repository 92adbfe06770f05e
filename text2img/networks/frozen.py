"""Networks used as measuring instruments, not models being trained."""

from __future__ import annotations

from torch import Tensor, nn


class FrozenNetwork(nn.Module):
    """Always in eval mode, whatever `.train()` its owner receives (Lightning calls it on the module that
    holds the metrics): BatchNorm keeps its pretrained statistics and dropout stays off while scoring."""

    def train(self, mode: bool = True) -> FrozenNetwork:
        return super().train(False)


def check_images(images: Tensor) -> None:
    """One line for the one input mistake a metric can diagnose: a batch that is not [B, 3, H, W]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")


class ImageFeatureExtractor(FrozenNetwork):
    """A pretrained classifier whose pooled features FID/KID are computed on and whose logits give the IS.

    `forward`: images [B, 3, H, W], uint8 in [0, 255] or float in [0, 1], any size -> [B, num_features]
    float32. Figures carry `feature_name` (`fid_effnet`): different extractors' figures do not compare.
    """

    num_features: int
    num_classes: int
    feature_name: str

    def logits(self, features: Tensor) -> Tensor:
        """Pooled features [B, num_features] -> class logits [B, num_classes]."""
        raise NotImplementedError
