"""Diversity of the samples of one prompt against samples of different prompts: a mode-collapse detector."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from text2img.metrics.base import EvalBatch, EvalContext, EvalMetric
from text2img.metrics.distribution import key_priority
from text2img.networks.frozen import ImageFeatureExtractor

log = logging.getLogger(__name__)

STATES = ("features", "pixels", "prompt", "priority")


def sample_priority(prompt: Tensor, keys: Tensor) -> Tensor:
    """A fixed order of samples that keeps the samples of a prompt together (prompt hash first, then key), so a
    bounded selection holds whole prompts; < 2^63 for keys below 2^30."""
    return key_priority(prompt) * 2**30 + keys.long()


def pairwise_means(x: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor | None]:
    """Mean distance over pairs of distinct samples of the same prompt, and over pairs of different prompts
    (None when every sample has the same prompt)."""
    distances = torch.cdist(x.double(), x.double())
    same = prompt[:, None] == prompt[None, :]
    others = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    across = distances[~same].mean() if (~same).any() else None
    return distances[same & others].mean(), across


class SampleDiversity(EvalMetric):
    """Samples of a prompt (evaluated with different seeds) should differ: near-identical ones mean mode collapse.

    For the prompts with at least 2 samples: `diversity_within_<space>`, the mean pairwise distance between
    samples of the same prompt; `diversity_across_<space>`, the mean distance between samples of different
    prompts; and `diversity_ratio_<space>` = within / across (near 0: every seed gives the same image; near 1:
    a prompt's samples vary as much as different prompts' samples; when even different prompts' samples differ
    by less than one grey level, total collapse, the ratios are 0). Spaces: the image features of `extractor`
    (L2, e.g. `_effnet`) and pixels (`_pixel`: RMS difference of [0, 1] values at `pixel_size`² per channel).

    Prompts repeat only when the evaluation has more samples than prompts (`n_samples`, `data.eval_samples`):
    without repeats the metric reports nothing and logs why once. Per-sample features are gathered by key
    (exact under DDP); at most `max_samples` are kept, whole prompts chosen by a fixed hash.
    """

    FIGURES = tuple(
        f"diversity_{kind}_{space}" for kind in ("within", "across", "ratio") for space in ("pixel", "{extractor}")
    )

    def __init__(self, extractor: ImageFeatureExtractor, max_samples: int = 2000, pixel_size: int = 32) -> None:
        super().__init__()
        if max_samples < 2:
            raise ValueError(f"metrics.diversity.max_samples={max_samples} must be at least 2; 2000 is usual")
        self.extractor = extractor
        self.max_samples = max_samples
        self.pixel_size = pixel_size
        for name in STATES:
            self.add_state(name, [], dist_reduce_fx="cat")
        self.row_of: dict[str, int] = {}
        self._explained = False

    def prepare(self, context: EvalContext) -> None:
        self.row_of = {caption: row for row, caption in enumerate(context.prompts)}

    def _bounded(self, columns: dict[str, Tensor]) -> dict[str, Tensor]:
        """The `max_samples` rows of smallest priority."""
        if len(columns["priority"]) <= self.max_samples:
            return columns
        keep = torch.topk(columns["priority"], self.max_samples, largest=False).indices
        return {name: value[keep] for name, value in columns.items()}

    def update(self, batch: EvalBatch) -> None:
        images = batch.outputs.images.float()
        device = images.device
        prompt = torch.tensor([self.row_of[caption] for caption in batch.outputs.captions], device=device)
        columns = {
            "features": batch.features(self.extractor).float().to(device),
            "pixels": F.adaptive_avg_pool2d(images, self.pixel_size).flatten(1),
            "prompt": prompt,
            "priority": sample_priority(prompt, batch.outputs.keys.to(device)),
        }
        if self.priority:  # one tensor per state, pruned after every batch
            columns = {name: torch.cat([getattr(self, name)[0], value]) for name, value in columns.items()}
        for name, value in self._bounded(columns).items():
            setattr(self, name, [value])

    def compute(self) -> dict[str, Tensor]:
        columns = self._bounded({name: dim_zero_cat(getattr(self, name)) for name in STATES})
        prompt = columns["prompt"]
        if int(torch.bincount(prompt).max()) < 2:
            if not self._explained:
                self._explained = True
                log.info(
                    "diversity: no prompt has two samples among the %d evaluated, so there is nothing to compare; "
                    "evaluate more samples than prompts (n_samples / data.eval_samples) to repeat prompts with new seeds",
                    len(prompt),
                )
            return {}
        pixel_scale = columns["pixels"].shape[1] ** 0.5  # L2 -> RMS per value
        spaces = {"pixel": pairwise_means(columns["pixels"], prompt)}
        spaces[self.extractor.feature_name] = pairwise_means(columns["features"], prompt)
        # Total collapse (every prompt gives the same image) leaves both distances at noise level, where their
        # ratio means nothing: below one grey level of RMS difference between prompts, the ratio is 0.
        across_pixel = spaces["pixel"][1]
        collapsed = across_pixel is not None and across_pixel / pixel_scale < 1 / 255
        if collapsed:
            log.warning("diversity: samples of different prompts differ by less than one grey level: total collapse")
        figures = {}
        for space, (within, across) in spaces.items():
            scale = pixel_scale if space == "pixel" else 1.0
            figures[f"diversity_within_{space}"] = (within / scale).float()
            if across is not None:
                figures[f"diversity_across_{space}"] = (across / scale).float()
                figures[f"diversity_ratio_{space}"] = (torch.zeros(()) if collapsed else within / across).float()
        return figures
