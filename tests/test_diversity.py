"""The diversity metric: within-prompt against across-prompt distances, a mode-collapse detector."""

import itertools
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import eval_batch
from text2img.metrics import SampleDiversity
from text2img.networks.frozen import ImageFeatureExtractor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a", "b", "c", "d"]


class ColourLayout(ImageFeatureExtractor):
    """A cheap stand-in extractor: mean colours of a 2x2 grid (the real EfficientNet costs seconds here)."""

    num_features = 12
    num_classes = 1
    feature_name = "layout"

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float(), 2).flatten(1)


def metric(**kwargs) -> SampleDiversity:
    diversity = SampleDiversity(ColourLayout(), **kwargs)
    diversity.prepare(SimpleNamespace(prompts=PROMPTS))
    return diversity


def repeated(per_prompt: int = 3) -> tuple[list[str], torch.Tensor]:
    """Captions a, b, c, d, a, b, ... as an evaluation set with more samples than prompts lists them."""
    captions = [PROMPTS[i % len(PROMPTS)] for i in range(per_prompt * len(PROMPTS))]
    return captions, torch.arange(len(captions))


def score(images, captions, keys, batches=1, **kwargs) -> dict[str, float]:
    diversity = metric(**kwargs)
    for part in torch.arange(len(keys)).chunk(batches):
        diversity.update(eval_batch(images[part], [captions[i] for i in part], keys[part]))
    return {name: float(value) for name, value in diversity.compute().items()}


def test_collapse_scores_zero_and_independent_samples_score_near_one():
    captions, keys = repeated()
    per_prompt = torch.rand(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    collapsed = per_prompt[[PROMPTS.index(c) for c in captions]]  # every seed of a prompt: the same image
    figures = score(collapsed, captions, keys)
    assert figures["diversity_within_pixel"] == 0 and figures["diversity_within_layout"] == 0
    assert figures["diversity_ratio_pixel"] == 0 and figures["diversity_ratio_layout"] == 0
    assert figures["diversity_across_pixel"] > 0.2

    independent = torch.rand(len(captions), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    figures = score(independent, captions, keys)
    assert 0.9 < figures["diversity_ratio_pixel"] < 1.1
    # uniform noise: the RMS difference of two independent U(0, 1) values is 1/sqrt(6)
    assert abs(figures["diversity_within_pixel"] - 6**-0.5) < 0.02


def test_total_collapse_scores_zero_whatever_the_noise(caplog):
    captions, keys = repeated()
    images = 1 - torch.rand(len(captions), 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 1e-3  # all white
    with caplog.at_level(logging.WARNING, logger="text2img.metrics.diversity"):
        figures = score(images, captions, keys)
    assert figures["diversity_ratio_pixel"] == 0 and figures["diversity_ratio_layout"] == 0
    assert figures["diversity_across_pixel"] < 1 / 255 and "total collapse" in caplog.text


def test_figures_are_the_mean_pairwise_distances():
    captions, keys = repeated()
    images = torch.rand(len(captions), 3, 8, 8, generator=torch.Generator().manual_seed(2))
    figures = score(images, captions, keys, pixel_size=8)
    features = ColourLayout()(images)
    within, across = [], []
    for i, j in itertools.permutations(range(len(captions)), 2):
        (within if captions[i] == captions[j] else across).append((features[i] - features[j]).norm())
    assert figures["diversity_within_layout"] == pytest.approx(float(torch.stack(within).mean()), rel=1e-5)
    assert figures["diversity_across_layout"] == pytest.approx(float(torch.stack(across).mean()), rel=1e-5)
    assert figures["diversity_ratio_layout"] == pytest.approx(
        figures["diversity_within_layout"] / figures["diversity_across_layout"], rel=1e-5
    )


def test_figures_do_not_depend_on_batching_or_order():
    captions, keys = repeated(4)
    images = torch.rand(len(captions), 3, 16, 16, generator=torch.Generator().manual_seed(3))
    whole = score(images, captions, keys)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(4))
    shuffled = score(images[order], [captions[i] for i in order], keys[order], batches=5)
    assert shuffled == pytest.approx(whole, rel=1e-6)


def test_bounded_memory_keeps_whole_prompts():
    captions, keys = repeated(3)  # 12 samples, 3 per prompt
    images = torch.rand(len(captions), 3, 16, 16, generator=torch.Generator().manual_seed(5))
    diversity = metric(max_samples=6)
    for part in keys.chunk(4):
        diversity.update(eval_batch(images[part], [captions[i] for i in part], keys[part]))
    kept = diversity.prompt[0]
    assert len(kept) == 6 and sorted(torch.bincount(kept)[torch.bincount(kept) > 0].tolist()) == [3, 3]
    # the figures are those of the two kept prompts alone
    rows = [i for i, c in enumerate(captions) if PROMPTS.index(c) in set(kept.tolist())]
    alone = score(images[rows], [captions[i] for i in rows], keys[rows])
    assert {n: float(v) for n, v in diversity.compute().items()} == pytest.approx(alone, rel=1e-6)


def test_without_repeated_prompts_it_reports_nothing_and_says_why_once(caplog):
    diversity = metric()
    images = torch.rand(4, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="text2img.metrics.diversity"):
        for _ in range(2):  # two validations
            diversity.update(eval_batch(images, PROMPTS, torch.arange(4)))
            assert diversity.compute() == {}
            diversity.reset()
    messages = [r.getMessage() for r in caplog.records if "diversity" in r.getMessage()]
    assert len(messages) == 1 and "more samples than prompts" in messages[0]


def test_max_samples_is_checked():
    with pytest.raises(ValueError, match="max_samples=1 must be at least 2"):
        SampleDiversity(ColourLayout(), max_samples=1)
