"""EfficientNet-Lite0 feature extractor and the FID built on it.

Feature extraction costs ~0.1 s per image on a 2-core CPU (every image is resized to 224 px), so the
FID checks share one extractor and one metric holding the real statistics, and use 32-image sets.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from text2img.metrics import EfficientNetLite0Features, build_fid, metric_name

N = 32  # images per FID set: below the 1280 feature dims on purpose (singular covariances must work)


def smooth_images(n: int, seed: int, size: int = 32) -> Tensor:
    """'Real-ish' images: smooth colour fields with a few solid discs, float in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic")
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for _ in range(3):
        centre = torch.rand(n, 2, 1, 1, generator=g)
        radius = 0.05 + 0.2 * torch.rand(n, 1, 1, generator=g)
        disc = (((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) < radius**2).float().unsqueeze(1)
        images = images * (1 - disc) + torch.rand(n, 3, 1, 1, generator=g) * disc
    return images.clamp(0, 1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # On a busy 2-core machine two intra-op threads stall each other (measured 2-30x slower here,
    # worst for small batches); one thread keeps these tests fast whatever else is running.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extractor() -> EfficientNetLite0Features:
    return EfficientNetLite0Features()


@pytest.fixture(scope="module")
def real_images() -> Tensor:
    return smooth_images(N, seed=0)


@pytest.fixture(scope="module")
def fid(extractor: EfficientNetLite0Features, real_images: Tensor) -> FrechetInceptionDistance:
    """One metric fed the real set once; each test resets it (real stats survive) and adds its fakes."""
    metric = build_fid(extractor)
    metric.update(real_images, real=True)
    return metric


def fid_against_real(fid: FrechetInceptionDistance, fake: Tensor) -> float:
    fid.reset()
    fid.update(fake, real=False)
    return fid.compute().item()


def test_features_shape_dtype_and_determinism(extractor: EfficientNetLite0Features) -> None:
    images = smooth_images(4, seed=1)
    features = extractor(images)
    assert features.shape == (4, 1280) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert torch.equal(features, extractor(images))
    # Different images must give clearly different features (not a constant / broken network).
    assert torch.cdist(features, features)[~torch.eye(4, dtype=torch.bool)].min() > 1.0


def test_uint8_and_float_inputs_agree_at_any_size(extractor: EfficientNetLite0Features) -> None:
    images = (smooth_images(2, seed=2, size=48) * 255).round().to(torch.uint8)
    assert torch.equal(extractor(images), extractor(images.float() / 255))
    # Larger than 224 (antialiased downsampling) and non-square inputs are fine too.
    big = F.interpolate(images.float() / 255, size=(300, 260), mode="bilinear")
    assert extractor(big).shape == (2, 1280)


def test_extractor_stays_frozen_in_eval_mode(extractor: EfficientNetLite0Features) -> None:
    parent = nn.ModuleDict({"features": extractor})
    parent.train()  # what Lightning does to the module owning the metric
    assert not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    images = smooth_images(2, seed=3).requires_grad_()
    assert not extractor(images).requires_grad


def test_fid_metric_name_and_feature_size(fid: FrechetInceptionDistance) -> None:
    assert metric_name(fid) == "fid_effnet"
    assert fid.real_features_sum.shape == (1280,)


def test_fid_of_identical_sets_is_zero(fid: FrechetInceptionDistance, real_images: Tensor) -> None:
    # Measured ~1e-5 in magnitude (sign varies): float64 eigvals of a rank-deficient product.
    assert abs(fid_against_real(fid, real_images)) < 1e-2


def test_fid_separates_noise_from_smooth_images(fid: FrechetInceptionDistance) -> None:
    noise = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert fid_against_real(fid, noise) > 100  # measured ~300


def test_fid_of_slightly_noisy_copy_is_small(fid: FrechetInceptionDistance, real_images: Tensor) -> None:
    # One grey level of noise; the extractor is texture-sensitive (4 levels already give ~90).
    g = torch.Generator().manual_seed(5)
    noisy = (real_images + torch.randn(real_images.shape, generator=g) / 255).clamp(0, 1)
    assert 0 < fid_against_real(fid, noisy) < 15  # measured ~5


def test_reset_keeps_real_statistics(fid: FrechetInceptionDistance) -> None:
    fid.reset()
    assert fid.real_features_num_samples == N and fid.fake_features_num_samples == 0
