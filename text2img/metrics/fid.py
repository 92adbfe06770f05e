"""FID on the offline EfficientNet-Lite0 extractor (torch-fidelity's Inception weights are not available)."""

from __future__ import annotations

from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from text2img.metrics.effnet import EfficientNetLite0Features


def build_fid(
    feature_extractor: nn.Module | None = None, reset_real_features: bool = False
) -> FrechetInceptionDistance:
    """FID whose `update(images, real=...)` takes float images [B,3,H,W] in [0,1], any size.

    `reset_real_features=False` by default: the real set rarely changes between validation epochs,
    so its statistics are kept across `reset()` and fed once.
    """
    extractor = feature_extractor if feature_extractor is not None else EfficientNetLite0Features()
    # With a custom network torchmetrics passes images through untouched; `normalize=True` only
    # documents that they are float in [0,1] (and makes a dummy probe, if any, float).
    return FrechetInceptionDistance(
        feature=extractor, reset_real_features=reset_real_features, normalize=True
    )


def metric_name(fid: FrechetInceptionDistance) -> str:
    """Log key that names the extractor, e.g. `fid_effnet`: scores from different extractors don't compare."""
    tag = getattr(fid.inception, "feature_name", type(fid.inception).__name__.lower())
    return f"fid_{tag}"
