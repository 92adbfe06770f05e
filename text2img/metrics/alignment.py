"""Prompt following of generated images, scored by the LiT evaluator (see `lit.py`)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor

from text2img.encoders.base import TextEncoder
from text2img.metrics.base import EvalBatch, EvalContext, EvalMetric
from text2img.networks.frozen import ImageFeatureExtractor
from text2img.networks.lit import LiTConfig, LiTEvaluator, clip_score, load_or_train_lit, r_precision_hits, real_alignment

log = logging.getLogger(__name__)


class LiTAlignment(EvalMetric):
    """`clip_score_lit` (100 * mean max(cos, 0) of image and prompt embeddings) and `r_precision` (the
    fraction of images whose own prompt ranks first among itself and k-1 other prompts of the split) of
    generated images, with the same two figures for the split's real images as the ceiling
    (`clip_score_lit_real`, `r_precision_real`) and for real images with shuffled prompts as the floor
    (`clip_score_lit_shuffled`, `r_precision_shuffled`).

    The evaluator is trained on the data's train split the first time a (dataset, extractor, encoder,
    config, seed) is seen, and cached under `<cache_dir>/lit/`.
    """

    FIGURES = tuple(f"{name}{kind}" for name in ("clip_score_lit", "r_precision") for kind in ("", "_real", "_shuffled"))

    def __init__(self, extractor: ImageFeatureExtractor, k: int = 32, config: LiTConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        if k < 2:
            raise ValueError(f"alignment k={k} must be at least 2 (the own prompt and one distractor); 32 is usual")
        self.extractor = extractor
        self.k = k
        self.config = config or LiTConfig()
        self.seed = seed
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.evaluator: LiTEvaluator | None = None
        self.candidates: Tensor | None = None
        self.row_of: dict[str, int] = {}
        self.real: dict[str, float] = {}

    def prepare(self, context: EvalContext) -> None:
        self.evaluator = load_or_train_lit(
            context.source, context.encoder, context.embeddings, context.features, self.extractor,
            context.cache_dir / "lit", self.config, self.seed,
        )
        if len(context.prompts) < 2:
            log.warning(
                "alignment: the %s split has a single distinct prompt: r_precision and the shuffled-prompt floor "
                "(*_shuffled) need at least 2 and are skipped",
                context.split,
            )
        elif len(context.prompts) < self.k:
            log.warning(
                "alignment: the %s split has %d distinct prompts, fewer than k=%d; R-precision uses k=%d",
                context.split, len(context.prompts), self.k, len(context.prompts),
            )
        self.k = min(self.k, len(context.prompts))
        self.row_of = {caption: row for row, caption in enumerate(context.prompts)}
        with torch.no_grad():
            self.candidates = self.evaluator.embed_text(context.prompt_text.to("cpu", torch.float32))
        captions = context.source.split(context.split, augmented=False).captions
        real_features = context.features.features(context.source, context.split, self.extractor)
        real_text = context.prompt_text[[self.row_of[caption] for caption in captions]]
        real = real_alignment(self.evaluator, real_features, real_text, captions, self.k, self.seed)
        self.real = {name if name.endswith("_shuffled") else f"{name}_real": value for name, value in real.items()}

    def update(self, batch: EvalBatch) -> None:
        assert self.evaluator is not None and self.candidates is not None, "prepare() first"
        features = batch.features(self.extractor).cpu()
        own = torch.tensor([self.row_of[caption] for caption in batch.outputs.captions])
        with torch.no_grad():
            images = self.evaluator.embed_images(features)
        if self.ranks:
            hits = r_precision_hits(images, self.candidates, own, batch.outputs.keys.cpu(), self.k, self.seed)
            self.hits += hits.double().sum().to(self.hits.device)
        self.score_sum += clip_score(images, self.candidates[own]).double().sum().to(self.score_sum.device)
        self.count += len(own)

    @property
    def ranks(self) -> bool:
        """Whether R-precision applies: it needs a distractor, so at least 2 distinct prompts."""
        return self.k >= 2

    def compute(self) -> dict[str, Tensor]:
        figures = {"clip_score_lit": (self.score_sum / self.count).float()}
        if self.ranks:
            figures["r_precision"] = (self.hits / self.count).float()
        return figures | {name: torch.tensor(value) for name, value in self.real.items()}


class FixedTextLiTAlignment(LiTAlignment):
    """`LiTAlignment` on a fixed text model (`text_encoder`, all-MiniLM-L6-v2 by default) instead of the run's
    encoder, reading the raw captions: the evaluator then depends on the data alone (it is trained once per dataset
    and cached), so its figures compare runs whose encoders, layers, templates or prompt expansions differ, where
    the per-encoder `r_precision` compares heads and generators within one encoder only. Its figures carry
    `_fixed` (`r_precision_fixed`, `r_precision_fixed_real`, ...), so both are logged side by side.
    """

    FIGURES = tuple(
        f"{name}_fixed{kind}" for name in ("clip_score_lit", "r_precision") for kind in ("", "_real", "_shuffled")
    )

    def __init__(
        self,
        extractor: ImageFeatureExtractor,
        text_encoder: TextEncoder,
        k: int = 32,
        config: LiTConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(extractor, k, config, seed)
        if text_encoder.trainable:
            raise ValueError("the fixed yardstick's text_encoder must be frozen (mode: frozen)")
        self.text_encoder = text_encoder

    def prepare(self, context: EvalContext) -> None:
        prompt_text = context.embeddings.lookup(self.text_encoder, context.prompts)
        super().prepare(replace(context, encoder=self.text_encoder, prompt_text=prompt_text))
        self.text_encoder.unload()

    def compute(self) -> dict[str, Tensor]:
        figures = super().compute()
        return {_fixed(name): value for name, value in figures.items()}


def _fixed(name: str) -> str:
    """clip_score_lit -> clip_score_lit_fixed, r_precision_real -> r_precision_fixed_real."""
    for kind in ("_real", "_shuffled"):
        if name.endswith(kind):
            return f"{name[: -len(kind)]}_fixed{kind}"
    return f"{name}_fixed"
