"""GenEval-style attribute scoring of generated images against `data=shapes` prompts, analytically.

The shapes benchmark (text2img.data.shapes) draws flat palette colours on white without
anti-aliasing, with shapes >= 2 px apart, so objects can be found exactly without a detector:

1. Pixels: a pixel is read as a mix of white and one palette colour (what blur makes of an edge).
   It belongs to the colour whose mix fits it best if that colour covers at least half of it and
   the misfit is under `colour_tolerance` (RGB distance, 0-255 scale); otherwise it is background.
   So a blurred shape keeps its 50 % outline whatever its colour, and grey or off-palette noise is
   dropped (at the default 60, no object is found in 1,000 uniform-noise images).
2. Objects: 4-connected components of each colour (every drawn shape is 4-connected; 8-connectivity
   would chain noise pixels); components of fewer pixels than `min_area_fraction` of a small square
   are specks of noise and ignored, the others have their holes (noisy pixels) filled.
3. Each object's attributes, from its bounding box (h x w) and mask:
   - colour: the component's palette colour;
   - shape: a triangle (apex up) has much less mass in the top half of its box than in the bottom
     half (ratio ~0.3, vs 1.0 for circles and squares): ratio < 0.7 -> triangle; otherwise the fill
     of the box tells a square (1.0) from a circle (~0.76-0.79): fill >= 0.86 -> square, else circle;
   - size: sqrt(h * w) against the midpoint of the small and large sides (10 px at 32 px);
   - centroid: the mask's centre of mass, in pixels with pixel centres at i + 0.5.
   The thresholds sit between the exact values of the renders, leaving room for blur and noise.

`score` checks each attribute of the prompt on all detected objects O, independently of the other
attributes (a wrong colour does not also count as a wrong count):
- colour: O is not empty and every object has the prompt's colour;
- shape: O is not empty and every object has the prompt's shape;
- size: O is not empty and every object has the prompt's size;
- position: O is not empty, every object's centroid is in the prompt's half, and the group's mean
  centroid is further from the image centre along that half's axis than across it (so a group in
  the top-left corner is neither "top" nor "left");
- count: |O| equals the prompt's count;
- overall: all five, which also means there is no extra object of any colour or shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from text2img.metrics.base import EvalBatch, EvalContext, EvalMetric
from text2img.data.shapes import BACKGROUND, COLOURS, Composition, Geometry, ShapesSource, parse_caption

ATTRIBUTES = ("colour", "shape", "size", "position", "count", "overall")
# Thresholds between the renders' exact values, nearer the side blur moves them to (it rounds every
# shape: squares lose corners, triangles their apex).
_TRIANGLE_TAPER = 0.7  # top-half / bottom-half mass: ~0.3 for triangles, 1.0 for circles and squares
_SQUARE_FILL = 0.86  # area / bounding box: 1.0 for squares, ~0.76-0.79 for circles


@dataclass(frozen=True)
class DetectedObject:
    """One shape found in an image."""

    colour: str
    shape: str
    size: str
    area: int  # pixels, holes filled
    centroid: tuple[float, float]  # (y, x) in pixels
    box: tuple[int, int, int, int]  # (top, left, bottom, right), bottom and right exclusive


class ShapesAttributeChecker:
    """Detects shapes analytically and scores images against shapes prompts (see the module docstring)."""

    def __init__(
        self, image_size: int, colour_tolerance: float = 60.0, min_area_fraction: float = 0.25
    ) -> None:
        if colour_tolerance <= 0:
            raise ValueError(
                f"colour_tolerance={colour_tolerance} must be a positive RGB distance; use e.g. 60"
            )
        if not 0 < min_area_fraction <= 1:
            raise ValueError(
                f"min_area_fraction={min_area_fraction} is a fraction of a small square; use e.g. 0.25"
            )
        self.geometry = Geometry.at(image_size)
        self.image_size = image_size
        self.colour_tolerance = colour_tolerance
        self.min_area = max(1, round(min_area_fraction * self.geometry.small**2))
        self._colour_names = list(COLOURS)
        self._background = np.array(BACKGROUND, dtype=np.float32)
        # Each palette colour as a direction away from white, rows in `_colour_names` order: [K, 3].
        self._inks = np.array(list(COLOURS.values()), dtype=np.float32) - self._background

    def detect(self, image: Tensor) -> list[DetectedObject]:
        """The objects of one image [3, H, W] float in [0, 1]."""
        labels = self._colour_labels(image)
        objects = []
        for index, colour in enumerate(self._colour_names):
            components, _ = ndimage.label(labels == index)
            areas = np.bincount(components.ravel())
            for number, box in enumerate(ndimage.find_objects(components), start=1):
                if areas[number] < self.min_area:
                    continue  # a speck of noise
                mask = ndimage.binary_fill_holes(components[box] == number)
                objects.append(self._describe(colour, mask, box))
        return objects

    def score(self, images: Tensor, captions: list[str]) -> dict[str, Tensor]:
        """Per image, whether each attribute of its caption is right: {attribute: bool [B]}.

        `images` [B, 3, H, W] float in [0, 1]; `captions` in the shapes grammar (`parse_caption`).
        """
        self._check_batch(images, captions)
        rows = [
            self._judge(self.detect(image), parse_caption(text))
            for image, text in zip(images, captions, strict=True)
        ]
        return {name: torch.tensor([row[name] for row in rows], dtype=torch.bool) for name in ATTRIBUTES}

    def _check_batch(self, images: Tensor, captions: list[str]) -> None:
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"images must be [B, 3, {size}, {size}] (the checker's image_size); got {tuple(images.shape)}"
            )
        # Values this low are not [0, 1] images: in [-1, 1] every palette colour has a channel below -0.5.
        if len(images) and images.min() < -0.5:
            raise ValueError("images look like they are in [-1, 1]; pass (images + 1) / 2, in [0, 1]")
        if len(captions) != len(images):
            raise ValueError(
                f"got {len(captions)} captions for {len(images)} images; pass one caption per image"
            )

    def _colour_labels(self, image: Tensor) -> np.ndarray:
        """[H, W] palette index of every pixel, -1 for background.

        A pixel is read as a mix `white + coverage * (colour - white)` of each palette colour: it
        belongs to the colour it fits best (smallest off-mix residual) if that colour covers at least
        half of it and the residual is within `colour_tolerance`.
        """
        rgb = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0
        from_white = rgb[:, :, None, :] - self._background  # [H, W, 1, 3]
        coverage = np.clip((from_white * self._inks).sum(-1) / (self._inks**2).sum(-1), 0.0, 1.0)
        residual = np.linalg.norm(from_white - coverage[..., None] * self._inks, axis=-1)  # [H, W, K]
        residual = np.where(coverage >= 0.5, residual, np.inf)
        best = residual.argmin(axis=-1)
        return np.where(residual.min(axis=-1) < self.colour_tolerance, best, -1)

    def _describe(self, colour: str, mask: np.ndarray, box: tuple[slice, slice]) -> DetectedObject:
        height, width = mask.shape
        centre_y, centre_x = ndimage.center_of_mass(mask)
        side = math.sqrt(height * width)
        return DetectedObject(
            colour=colour,
            shape=_shape_of(mask),
            size="large" if side > (self.geometry.small + self.geometry.large) / 2 else "small",
            area=int(mask.sum()),
            centroid=(box[0].start + centre_y + 0.5, box[1].start + centre_x + 0.5),
            box=(box[0].start, box[1].start, box[0].stop, box[1].stop),
        )

    def _judge(self, objects: list[DetectedObject], prompt: Composition) -> dict[str, bool]:
        found = bool(objects)
        verdict = {
            "colour": found and all(o.colour == prompt.colour for o in objects),
            "shape": found and all(o.shape == prompt.shape for o in objects),
            "size": found and all(o.size == prompt.size for o in objects),
            "position": found and self._in_position(objects, prompt.position),
            "count": len(objects) == prompt.count,
        }
        verdict["overall"] = all(verdict.values())
        return verdict

    def _in_position(self, objects: list[DetectedObject], position: str) -> bool:
        """Every centroid in the half, and the group's centre further along its axis than across."""
        centre = self.image_size / 2
        offsets = np.array([(y - centre, x - centre) for y, x in (o.centroid for o in objects)])
        # The offset that must be negative ("top": y above the centre) or positive, per position.
        axis, sign = {"top": (0, -1), "bottom": (0, 1), "left": (1, -1), "right": (1, 1)}[position]
        along = sign * offsets[:, axis]
        group_along, group_across = along.mean(), abs(offsets[:, 1 - axis].mean())
        return bool((along > 0).all() and group_along > group_across)


def _shape_of(mask: np.ndarray) -> str:
    """Circle, square or triangle from a filled component mask cropped to its bounding box."""
    height = mask.shape[0]
    top, bottom = mask[: height // 2].sum(), mask[height - height // 2 :].sum()
    if top < _TRIANGLE_TAPER * bottom:
        return "triangle"
    return "square" if mask.mean() >= _SQUARE_FILL else "circle"


class AttributeAccuracy(EvalMetric):
    """GenEval-style accuracy per attribute (`attr_colour` ... `attr_overall`) of generated images, for data
    sources that come with an attribute checker (`data=shapes`); reports nothing for other data.

    `attr_overall_real` is the checker's own accuracy on the split's real images: the ceiling that
    generated images are read against.
    """

    FIGURES = (*(f"attr_{name}" for name in ATTRIBUTES), "attr_overall_real")

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(len(ATTRIBUTES), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.checker: ShapesAttributeChecker | None = None
        self.real_accuracy: float | None = None

    def prepare(self, context: EvalContext) -> None:
        source = context.source
        self.checker = ShapesAttributeChecker(source.image_size) if isinstance(source, ShapesSource) else None
        if self.checker is not None:
            split = context.source.split(context.split, augmented=False)
            real = torch.stack([image for image, _ in split]).add(1).div(2)
            self.real_accuracy = self.checker.score(real, split.captions)["overall"].float().mean().item()

    def update(self, batch: EvalBatch) -> None:
        if self.checker is None:
            return
        scores = self.checker.score(batch.outputs.images.cpu(), batch.outputs.captions)
        correct = torch.stack([scores[name].double().sum() for name in ATTRIBUTES])
        self.correct += correct.to(self.correct.device)
        self.count += len(batch.outputs)

    def compute(self) -> dict[str, Tensor]:
        if self.checker is None or self.count == 0:
            return {}
        accuracy = (self.correct / self.count).float()
        figures = {f"attr_{name}": value for name, value in zip(ATTRIBUTES, accuracy)}
        figures["attr_overall_real"] = torch.tensor(self.real_accuracy)
        return figures
