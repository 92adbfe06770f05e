"""The shapes benchmark: deterministic cached renders, held-out splits, caption grammar, checker."""

from __future__ import annotations

import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, eval_batch
from hydra.utils import instantiate
from torch import Tensor

import text2img.data.shapes as shapes_module
from text2img.data import ImageAugment, ShapesSource
from text2img.data.shapes import (
    COLOURS,
    COUNTS,
    DEFAULT_HELD_OUT,
    PHRASINGS,
    POSITIONS,
    SHAPES,
    SIZES,
    Composition,
    all_compositions,
    caption,
    parse_caption,
)
from text2img.metrics.attributes import ATTRIBUTES, ShapesAttributeChecker

# (blur sigma px, noise std) -> floor of overall accuracy on the 384 val + test images. Measured with
# seed 0: 1.0 (slight blur) and 0.958 (heavy: small shapes start to look round); the floors leave
# room for platform differences in the noise.
DEGRADED_FLOORS = {(0.7, 0.06): 0.99, (0.9, 0.1): 0.93}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> ShapesSource:
    return ShapesSource(cache_dir=tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def checker(shapes: ShapesSource) -> ShapesAttributeChecker:
    return ShapesAttributeChecker(shapes.image_size)


def as_unit(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1], the checker's input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def held_out_items(source: ShapesSource) -> tuple[Tensor, list[str], list[Composition]]:
    indices = source.split_indices["val"] + source.split_indices["test"]
    return (
        as_unit(source.images[indices]),
        [source.captions[i] for i in indices],
        [source.compositions[i] for i in indices],
    )


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [N, 3, H, W]: the soft edges a generator draws."""
    radius = max(1, round(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # [3, 1, 1, K]: one per channel
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, kernel, groups=3)
    return F.conv2d(rows, kernel.transpose(-1, -2), groups=3)


def accuracy(scores: dict[str, Tensor]) -> dict[str, float]:
    return {name: scores[name].float().mean().item() for name in ATTRIBUTES}


# ---------------------------------------------------------------- rendering and cache


def test_renders_are_exact_palette_drawings(shapes: ShapesSource) -> None:
    assert shapes.images.shape == (1920, 32, 32, 3) and shapes.images.dtype == np.uint8
    assert len(shapes.compositions) == len(shapes.captions) == 1920
    for index in range(0, 1920, 97):
        colours = {tuple(c) for c in shapes.images[index].reshape(-1, 3).tolist()}
        assert colours == {(255, 255, 255), COLOURS[shapes.compositions[index].colour]}, "no anti-aliasing"
    corners = shapes.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all(), "shapes keep off the border"
    for start in range(0, 1920, 8 * 37):  # the 8 images of one composition have varied layouts
        assert len({image.tobytes() for image in shapes.images[start : start + 8]}) >= 4


def test_render_is_deterministic_and_cached(
    shapes: ShapesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    again = ShapesSource(cache_dir=tmp_path)
    assert np.array_equal(again.images, shapes.images) and again.captions == shapes.captions
    assert again.identity == shapes.identity and again.cache_path.parent == tmp_path

    def fail(*args: object) -> None:
        raise AssertionError("rendered again instead of loading the cache")

    monkeypatch.setattr(shapes_module, "render_shapes", fail)
    start = time.perf_counter()
    cached = ShapesSource(cache_dir=tmp_path)
    assert time.perf_counter() - start < 0.5
    assert np.array_equal(cached.images, shapes.images) and cached.compositions == shapes.compositions


def test_seed_and_params_change_renders_and_identity(shapes: ShapesSource, tmp_path: Path) -> None:
    other_seed = ShapesSource(cache_dir=tmp_path, seed=1)
    assert not np.array_equal(other_seed.images, shapes.images)
    assert other_seed.captions == shapes.captions, "captions follow the compositions, not the seed"
    identities = {
        shapes.identity,
        other_seed.identity,
        ShapesSource(cache_dir=tmp_path, images_per_composition=2).identity,
        ShapesSource(cache_dir=tmp_path, image_size=48, images_per_composition=1).identity,
        ShapesSource(cache_dir=tmp_path, held_out=["yellow circle"]).identity,
    }
    assert len(identities) == 5


def test_every_phrasing_is_used(shapes: ShapesSource) -> None:
    per_phrasing = {
        p: sum(c == caption(shapes.compositions[0], p) for c in shapes.captions[:8]) for p in range(4)
    }
    assert per_phrasing == {0: 2, 1: 2, 2: 2, 3: 2}
    assert len(set(shapes.captions)) == len(all_compositions()) * len(PHRASINGS) == 960


# ---------------------------------------------------------------- splits


def test_splits_hold_out_pairs(shapes: ShapesSource) -> None:
    splits = shapes.split_indices
    assert {name: len(indices) for name, indices in splits.items()} == {
        "train": 1536,
        "val": 192,
        "test": 192,
    }
    assert not set(splits["val"]) & set(splits["test"])
    pairs = {name: {shapes.compositions[i].pair for i in indices} for name, indices in splits.items()}
    assert pairs["val"] == pairs["test"] == set(DEFAULT_HELD_OUT)
    assert not pairs["train"] & set(DEFAULT_HELD_OUT) and len(pairs["train"]) == 12
    captions = {name: set(shapes.split(name).captions) for name in splits}
    assert not captions["val"] & captions["test"] and not captions["train"] & (
        captions["val"] | captions["test"]
    )
    for name in ("val", "test"):
        seen = [shapes.compositions[i] for i in splits[name]]
        assert {c.size for c in seen} == set(SIZES) and {c.count for c in seen} == set(COUNTS)
        assert {c.position for c in seen} == set(POSITIONS)


def test_custom_held_out_and_train_only_augment(tmp_path: Path) -> None:
    augment = ImageAugment(color_jitter=0.1)
    source = ShapesSource(
        cache_dir=tmp_path, images_per_composition=1, held_out=["Yellow  Circle"], augment=augment
    )
    assert {source.compositions[i].pair for i in source.split_indices["test"]} == {"yellow circle"}
    assert len(source.split("val")) == len(source.split("test")) == 8
    assert source.split("train").transform is augment and source.split("val").transform is None
    assert source.split("train", augmented=False).transform is None


# ---------------------------------------------------------------- captions


def test_every_phrasing_parses_back() -> None:
    for composition in all_compositions():
        for phrasing in range(len(PHRASINGS)):
            assert parse_caption(caption(composition, phrasing)) == composition


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Two small red circles at the top.", Composition("red", "circle", "small", 2, "top")),
        ("at the bottom : one large blue square", Composition("blue", "square", "large", 1, "bottom")),
        (
            "a pair of large purple triangles in the left half",
            Composition("purple", "triangle", "large", 2, "left"),
        ),
        (
            "there is a small yellow triangle on the right side",
            Composition("yellow", "triangle", "small", 1, "right"),
        ),
        ("an  small green square   on the left", Composition("green", "square", "small", 1, "left")),
    ],
)
def test_user_prompts_parse(prompt: str, expected: Composition) -> None:
    assert parse_caption(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "two red circles at the top",
        "two small pink circles at the top",
        "two small red circles",
        "at the top: two small red circles at the bottom",
        "three small red circles at the top",
        "",
    ],
)
def test_unparseable_prompt_raises_one_line(prompt: str) -> None:
    with pytest.raises(
        ValueError, match=r"as a shapes prompt; write e.g. 'two small red circles at the top'"
    ) as info:
        parse_caption(prompt)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"held_out": ["pink circle"]},
            r"data.source.held_out has unknown pair 'pink circle'; use '<colour> <shape>'",
        ),
        ({"held_out": ["red hexagon"]}, r"unknown pair 'red hexagon'"),
        ({"held_out": []}, r"data.source.held_out is empty.*hold out at least one pair"),
        ({"held_out": "red circle"}, r"data.source.held_out='red circle' is one string; give a list"),
        ({"held_out": [f"{c} triangle" for c in COLOURS]}, r"every 'triangle' pair.*keep at least one"),
        ({"held_out": [f"purple {s}" for s in SHAPES]}, r"every 'purple' pair"),
        ({"image_size": 16}, r"data.source.image_size=16 is too small.*use 32 or more"),
        ({"images_per_composition": 0}, r"data.source.images_per_composition=0 must be a positive count"),
        ({"augment": ImageAugment(hflip=0.5)}, r"data.source.augment flips or crops.*set hflip=0"),
        ({"augment": ImageAugment(random_crop_scale=0.8)}, r"random_crop_scale=1 for data=shapes"),
    ],
)
def test_bad_arguments_raise_one_line(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        ShapesSource(cache_dir=tmp_path, **kwargs)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir()), "arguments are checked before rendering"


def test_checker_rejects_mismatched_batches(checker: ShapesAttributeChecker) -> None:
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\]"):
        checker.score(torch.zeros(2, 3, 64, 64), ["a small red circle at the top"] * 2)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]; pass \(images \+ 1\) / 2"):
        checker.score(-torch.ones(1, 3, 32, 32), ["a small red circle at the top"])
    with pytest.raises(ValueError, match="got 1 captions for 2 images"):
        checker.score(torch.zeros(2, 3, 32, 32), ["a small red circle at the top"])


# ---------------------------------------------------------------- checker


def test_detect_reads_one_render_exactly(shapes: ShapesSource, checker: ShapesAttributeChecker) -> None:
    index = shapes.compositions.index(Composition("yellow", "triangle", "large", 2, "right"))
    objects = checker.detect(as_unit(shapes.images[index : index + 1])[0])
    assert len(objects) == 2
    for found in objects:
        assert (found.colour, found.shape, found.size) == ("yellow", "triangle", "large")
        top, left, bottom, right = found.box
        assert bottom - top == right - left == 13 and left >= 16
        assert found.area == 85 and found.centroid[1] > 16


def test_checker_is_exact_on_held_out_renders(shapes: ShapesSource, checker: ShapesAttributeChecker) -> None:
    images, captions, _ = held_out_items(shapes)
    assert accuracy(checker.score(images, captions)) == dict.fromkeys(ATTRIBUTES, 1.0)


def test_checker_is_exact_at_other_sizes(tmp_path: Path) -> None:
    source = ShapesSource(cache_dir=tmp_path, image_size=48, images_per_composition=1)
    scores = ShapesAttributeChecker(source.image_size).score(as_unit(source.images), source.captions)
    assert accuracy(scores) == dict.fromkeys(ATTRIBUTES, 1.0)


def _swapped(composition: Composition, attribute: str) -> Composition:
    """The same composition with `attribute` changed to another value."""
    choices = {
        "colour": list(COLOURS),
        "shape": SHAPES,
        "size": SIZES,
        "count": COUNTS,
        "position": POSITIONS,
    }
    values = choices[attribute]
    other = values[(list(values).index(getattr(composition, attribute)) + 1) % len(values)]
    return Composition(**{**composition.__dict__, attribute: other})


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "count", "position"])
def test_wrong_prompts_fail_exactly_that_attribute(
    shapes: ShapesSource, checker: ShapesAttributeChecker, attribute: str
) -> None:
    images, _, compositions = held_out_items(shapes)
    wrong = [caption(_swapped(c, attribute), i % len(PHRASINGS)) for i, c in enumerate(compositions)]
    scores = accuracy(checker.score(images, wrong))
    expected = {name: 1.0 for name in ATTRIBUTES} | {attribute: 0.0, "overall": 0.0}
    assert scores == expected


def test_extra_objects_fail_overall(shapes: ShapesSource, checker: ShapesAttributeChecker) -> None:
    index = shapes.compositions.index(Composition("red", "circle", "small", 1, "top"))
    image = shapes.images[index].copy()
    image[-6:-2, 2:6] = COLOURS["blue"]  # a stray blue square in the bottom-left corner
    scores = checker.score(as_unit(image[None]), [shapes.captions[index]])
    assert not scores["overall"].item() and not scores["count"].item() and not scores["colour"].item()


def test_noise_scores_zero(checker: ShapesAttributeChecker) -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(200, 3, 32, 32, generator=generator)
    prompts = [caption(c, 0) for c in all_compositions()[:200]]
    assert accuracy(checker.score(noise, prompts))["overall"] == 0.0
    assert sum(len(checker.detect(image)) for image in noise) == 0
    assert accuracy(checker.score(torch.ones(4, 3, 32, 32), prompts[:4])) == dict.fromkeys(ATTRIBUTES, 0.0)


@pytest.mark.parametrize(("sigma", "noise"), list(DEGRADED_FLOORS))
def test_checker_survives_blur_and_noise(
    shapes: ShapesSource, checker: ShapesAttributeChecker, sigma: float, noise: float
) -> None:
    images, captions, _ = held_out_items(shapes)
    generator = torch.Generator().manual_seed(0)
    degraded = (gaussian_blur(images, sigma) + noise * torch.randn(images.shape, generator=generator)).clamp(
        0, 1
    )
    scores = accuracy(checker.score(degraded, captions))
    assert scores["overall"] >= DEGRADED_FLOORS[(sigma, noise)], scores
    assert min(scores.values()) == scores["overall"]


# ---------------------------------------------------------------- config


def test_hydra_config_builds_the_source(tmp_path: Path) -> None:
    cfg = compose_train(
        tmp_path, ["data=shapes", "encoder=tiny", f"data.source.cache_dir={tmp_path / 'shapes'}"]
    )
    source = instantiate(cfg.data.source)
    assert isinstance(source, ShapesSource)
    assert source.held_out == frozenset(DEFAULT_HELD_OUT) and source.image_size == 32
    assert len(source.split("train")) == 1536 and source.cache_path.parent == tmp_path / "shapes"


# ---------------------------------------------------------------- the evaluation metric


def metric_figures(shapes: ShapesSource, images: Tensor, captions: list[str], parts: int = 1) -> dict[str, float]:
    """AttributeAccuracy over (images, captions) of the test split, fed in `parts` metric copies merged as DDP does."""
    from text2img.metrics import AttributeAccuracy

    metrics = [AttributeAccuracy() for _ in range(parts)]
    context = SimpleNamespace(source=shapes, split="test")
    for metric, part in zip(metrics, torch.arange(len(images)).chunk(parts)):
        metric.prepare(context)
        metric.update(eval_batch(images[part], [captions[i] for i in part], keys=part))
    for other in metrics[1:]:
        metrics[0].merge_state(other)
    return {name: value.item() for name, value in metrics[0].compute().items()}


def test_attribute_accuracy_metric_reads_real_images_as_perfect(shapes: ShapesSource) -> None:
    indices = shapes.split_indices["test"]
    images, captions = as_unit(shapes.images[indices]), [shapes.captions[i] for i in indices]
    perfect = metric_figures(shapes, images, captions, parts=2)
    assert perfect == {f"attr_{name}": 1.0 for name in ATTRIBUTES} | {"attr_overall_real": 1.0}
    # another image's prompt (neighbours share a composition, so shuffle): most attributes turn wrong
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = metric_figures(shapes, images, [captions[i] for i in order])
    assert shuffled["attr_overall"] < 0.1 and shuffled["attr_overall_real"] == 1.0


def test_attribute_accuracy_reports_nothing_without_a_checker(shapes: ShapesSource) -> None:
    from text2img.metrics import AttributeAccuracy

    metric = AttributeAccuracy()
    metric.prepare(SimpleNamespace(source=object(), split="test"))
    assert metric.checker is None
