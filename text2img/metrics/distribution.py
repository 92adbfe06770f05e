"""FID, KID and Inception Score of generated images, from one feature pass, in bounded memory.

torchmetrics' FID keeps sums (streaming, exact under DDP) but its KID and IS keep every feature and
draw random subsets, so their memory grows with the number of samples and their value depends on
the order in which processes gather. This metric keeps, for the generated images:
- FID: the feature sum and the sum of outer products (float64), as torchmetrics does;
- KID: a bottom-k sketch, the `kid_sketch_size` samples whose hashed key is smallest. Keys are
  sample positions in the evaluation set, so the sketch is the same set of images however the
  samples are batched or spread over processes; KID is the unbiased MMD over all its pairs;
- IS: the sum of p log p and of p over samples (a single split), which gives
  exp(E_x KL(p(y|x) || p(y))) exactly.
The real side (reference) comes from the cached features of the whole real split.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from text2img.metrics.base import EvalBatch, EvalContext, EvalMetric
from text2img.networks.frozen import ImageFeatureExtractor

log = logging.getLogger(__name__)


def key_priority(keys: Tensor) -> Tensor:
    """A fixed pseudo-random order of sample keys (a multiplicative hash modulo a prime > 2^32)."""
    return (keys.long() * 2654435761 + 12345) % 4294967311


def bottom_k(features: Tensor, priority: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The rows with the k smallest priorities (all rows when there are no more than k)."""
    if len(priority) <= k:
        return features, priority
    keep = torch.topk(priority, k, largest=False).indices
    return features[keep], priority[keep]


# The two formulas below are torchmetrics' (`image.fid._compute_fid`, `image.kid.poly_kernel`), written out
# because importing those modules fails outright where torch-fidelity is installed with a broken torchvision.
def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    """||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the trace of the root from the eigenvalues of C1 C2."""
    root_trace = torch.linalg.eigvals(cov1 @ cov2).sqrt().real.sum()
    return (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * root_trace


def poly_kernel(x: Tensor, y: Tensor, degree: int) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** degree


def unbiased_mmd2(x: Tensor, y: Tensor, degree: int = 3) -> Tensor:
    """Unbiased MMD^2 with the polynomial kernel (x.y/d + 1)^degree (the KID definition); sizes may differ."""
    m, n = len(x), len(y)
    k_xx, k_yy = poly_kernel(x, x, degree), poly_kernel(y, y, degree)
    k_xy = poly_kernel(x, y, degree)
    same_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    same_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return same_x + same_y - 2 * k_xy.mean()


def mean_and_covariance(count: Tensor, total: Tensor, outer: Tensor) -> tuple[Tensor, Tensor]:
    mean = total / count
    covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return mean, covariance


class ImageDistribution(EvalMetric):
    """`fid_<extractor>`, `kid_<extractor>` and `is_<extractor>` of generated images against a real split.

    The name carries the extractor: EfficientNet-Lite0 figures do not compare with published
    Inception ones. FID needs more samples than feature dimensions for a full-rank covariance; with
    fewer it is still computed (and comparable between runs of the same size) but biased upward,
    and a warning gives the number needed.
    """

    FIGURES = ("fid_{extractor}", "kid_{extractor}", "is_{extractor}")

    def __init__(
        self, extractor: ImageFeatureExtractor, kid_sketch_size: int = 2000, kid_degree: int = 3, inception_score: bool = True
    ) -> None:
        super().__init__()
        if kid_sketch_size < 2:
            raise ValueError(f"kid_sketch_size={kid_sketch_size} must be at least 2; 1000-4000 is typical")
        self.extractor = extractor
        self.tag = extractor.feature_name
        self.kid_sketch_size = kid_sketch_size
        self.kid_degree = kid_degree
        self.inception_score = inception_score
        dim = extractor.num_features
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sketch", [], dist_reduce_fx="cat")
        self.add_state("sketch_priority", [], dist_reduce_fx="cat")
        if inception_score:
            self.add_state("plogp", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("probs", torch.zeros(extractor.num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.reference: dict[str, Tensor] | None = None
        self.real_count = 0
        self._warned_small = False
        self._warned_skipped = False

    def prepare(self, context: EvalContext) -> None:
        self.set_reference(context.features.features(context.source, context.split, self.extractor, context.device))

    def set_reference(self, real_features: Tensor) -> None:
        """Statistics of the real images (a plain attribute, not a state: every process holds all of it); none
        from fewer than 2 (`compute` then skips FID and KID)."""
        real = real_features.double()
        self.real_count = len(real)
        if len(real) < 2:
            self.reference = {}
            return
        sketch, _ = bottom_k(real, key_priority(torch.arange(len(real))), self.kid_sketch_size)
        self.reference = {"mean": real.mean(0), "covariance": torch.cov(real.T), "sketch": sketch}

    def update(self, batch: EvalBatch) -> None:
        features = batch.features(self.extractor)
        probs = self.extractor.logits(features).double().softmax(-1) if self.inception_score else None
        wide = features.double()
        self.count += len(wide)
        self.total += wide.sum(0)
        self.outer += wide.T @ wide
        features = features.float()
        priority = key_priority(batch.outputs.keys.to(features.device))
        if self.sketch:  # one tensor per state, pruned after every batch
            features = torch.cat([self.sketch[0], features])
            priority = torch.cat([self.sketch_priority[0], priority])
        sketch, priority = bottom_k(features, priority, self.kid_sketch_size)
        self.sketch, self.sketch_priority = [sketch], [priority]
        if probs is not None:
            self.plogp += torch.special.xlogy(probs, probs).sum()
            self.probs += probs.sum(0)

    def compute(self) -> dict[str, Tensor]:
        if self.reference is None:
            raise RuntimeError("ImageDistribution.prepare (or set_reference) must run before compute")
        figures = {}
        if self.count < 2 or not self.reference:
            if not self._warned_skipped:
                self._warned_skipped = True
                log.warning(
                    "fid_%s and kid_%s are skipped: they need at least 2 real and 2 generated images, got %d and %d",
                    self.tag, self.tag, self.real_count, int(self.count),
                )
        else:
            figures = self._distances()
        if self.inception_score and self.count > 0:
            marginal = self.probs / self.count
            mean_kl = self.plogp / self.count - torch.special.xlogy(marginal, marginal).sum()
            figures[f"is_{self.tag}"] = mean_kl.exp().float()
        return figures

    def _distances(self) -> dict[str, Tensor]:
        """FID and KID against the reference (at least 2 images a side)."""
        self._warn_if_small()
        mean, covariance = mean_and_covariance(self.count, self.total, self.outer)
        ref = {name: value.to(mean.device) for name, value in self.reference.items()}
        sketch, _ = bottom_k(dim_zero_cat(self.sketch), dim_zero_cat(self.sketch_priority), self.kid_sketch_size)
        return {
            f"fid_{self.tag}": frechet_distance(mean, covariance, ref["mean"], ref["covariance"]).float(),
            f"kid_{self.tag}": unbiased_mmd2(ref["sketch"], sketch.double(), self.kid_degree).float(),
        }

    def _warn_if_small(self) -> None:
        needed = self.extractor.num_features + 1
        if self.count < needed and not self._warned_small:
            self._warned_small = True
            log.warning(
                "fid_%s from %d generated images: a stable %d-d covariance needs at least %d; the figure is "
                "biased upward (compare only runs of the same size) - use n_samples>=%d",
                self.tag, int(self.count), needed - 1, needed, needed,
            )
