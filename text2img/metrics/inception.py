"""The standard FID InceptionV3 (torch-fidelity's weights, through torchmetrics) as a feature extractor.

Needs torch-fidelity, a working torchvision and the weights file (downloaded once); where any of these is
missing, construction fails with a one-line ConfigError and `EfficientNetLite0Features` is the offline choice.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from text2img.errors import ConfigError
from text2img.networks.frozen import ImageFeatureExtractor, check_images

_MISSING_DEPENDENCY = (
    "extractor=inception needs torch-fidelity with a working torchvision (pip install torch-fidelity) and "
    "the FID Inception weights (weights-inception-2015-12-05-6726825d.pth, or set extractor.weights_path); "
    "use extractor=effnet_lite0 offline"
)


def _weights_file(weights_path: str | None, url: str) -> Path:
    """The weights to load: `weights_path`, else torch.hub's cached copy of `url` (downloaded if absent)."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"extractor.weights_path={weights_path}: no such file; point it at the FID Inception weights "
                f"({url}) or use extractor=effnet_lite0 offline"
            )
        return path
    # Where torch-fidelity's own `load_state_dict_from_url` caches it, so an existing download is reused.
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        with contextlib.suppress(OSError):  # offline: reported below as the missing file
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
    if not path.is_file():
        raise ConfigError(
            f"extractor=inception: no Inception weights at {path} and downloading {url} failed; put the file "
            "there or set extractor.weights_path; use extractor=effnet_lite0 offline"
        )
    return path


class InceptionFeatures(ImageFeatureExtractor):
    """Frozen FID InceptionV3: images [B,3,H,W] -> 2048-d pool features, as in torchmetrics' default FID.

    Accepts uint8 images in [0,255] or float images in [0,1] (decided by dtype) of any size.
    """

    # torchmetrics reads this instead of probing the network with a dummy image.
    num_features = 2048
    num_classes = 1008  # ImageNet logits (TF's 1001 classes, padded), for the Inception Score
    # Short tag that metric names carry (`fid_inception`): scores of different extractors are not comparable.
    feature_name = "inception"

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
            from torchmetrics.image.fid import NoTrainInceptionV3
        except Exception as exc:  # torch-fidelity imports torchvision eagerly; a broken one fails many ways
            raise ConfigError(_MISSING_DEPENDENCY) from exc
        weights = _weights_file(weights_path, URL_INCEPTION_V3)
        # The network, layer and resize (antialiased bilinear) of torchmetrics' FrechetInceptionDistance().
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
        )  # frozen by torch-fidelity (requires_grad off), kept in eval by torchmetrics
        self.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        check_images(images)
        # The network takes 8-bit images only. Rounding (torchmetrics truncates) maps uint8 data that went
        # through /255 back to the same levels, so float and uint8 inputs agree.
        if images.is_floating_point():
            images = images.clamp(0, 1).mul(255).round()
        pixels = images.to(device=self.net.fc.weight.device, dtype=torch.uint8)
        # Features feed float64 covariances; keep them out of bf16/fp16 autocast.
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            return self.net(pixels).float()

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """Pooled features [B,2048] -> the network's 1008 ImageNet logits [B,1008] (for Inception Score).

        The fc layer without its bias: torch-fidelity's `logits_unbiased`, the default input of
        torchmetrics' InceptionScore.
        """
        weight = self.net.fc.weight
        x = features.to(device=weight.device, dtype=weight.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return (x @ weight.T).float()
