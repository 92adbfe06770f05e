"""The contract between evaluation metrics and the callback (or CLI) that feeds them.

A metric is a torchmetrics `Metric` whose states are sums or bounded sketches, so memory does not grow
with the number of samples and DDP processes combine exactly. It is built from config with its
hyper-parameters only; what depends on the run (the data source, the split, the text encoder, caches)
arrives once per stage through `prepare(EvalContext)`, before the first `update(EvalBatch)`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric

from text2img.data.base import ImageCaptionSource
from text2img.encoders.base import TextEncoder
from text2img.encoders.cache import EmbeddingCache
from text2img.networks.features import RealFeatureCache, extractor_identity
from text2img.networks.frozen import ImageFeatureExtractor
from text2img.types import EvalOutputs, TextEmbedding


@dataclass
class EvalContext:
    """The run-specific inputs of a stage's metrics.

    prompts / prompt_text: the distinct captions of the evaluation split and their embeddings (the
    candidate set of retrieval metrics such as R-precision).
    """

    source: ImageCaptionSource
    split: str
    encoder: TextEncoder
    embeddings: EmbeddingCache
    features: RealFeatureCache
    cache_dir: Path
    prompts: list[str]
    prompt_text: TextEmbedding
    device: torch.device = torch.device("cpu")


@dataclass
class EvalBatch:
    """One batch of evaluation outputs, with image features computed once per extractor and shared by
    every metric that uses the same network (FID, KID, IS and the alignment evaluator)."""

    outputs: EvalOutputs
    _features: dict[str, Tensor] = field(default_factory=dict)

    def features(self, extractor: ImageFeatureExtractor) -> Tensor:
        key = extractor_identity(extractor)
        if key not in self._features:
            self._features[key] = extractor(self.outputs.images)
        return self._features[key]


class EvalMetric(Metric):
    """Base of the metrics the `Evaluation` callback and `text2img.evaluate` run."""

    # Figures are whole-set statistics; per-batch values are never wanted.
    full_state_update = False
    # Every figure `compute` can return, "{extractor}" standing for the image extractor's `feature_name`: what a
    # config may name as `optimized_metric`, checked before anything is built (`text2img.run.config_checks`).
    FIGURES: tuple[str, ...] = ()

    def prepare(self, context: EvalContext) -> None:  # noqa: B027 - most metrics need no context
        """Load or build what depends on the run (reference statistics, an evaluator)."""

    @abstractmethod
    def update(self, batch: EvalBatch) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, Tensor]:
        """Named figures, e.g. {"fid_effnet": ...}; empty when the metric does not apply."""
