"""A compositional benchmark: flat coloured shapes captioned by colour, shape, size, count and position.

Every image is a white square with a group of identical shapes, e.g. "two small red circles at the
top". The truth of each image is a `Composition` (colour, shape, size, count, position), recoverable
from its caption with `parse_caption`, and `ShapesAttributeChecker` (text2img.metrics.attributes)
scores generated images against their prompts exactly, because the drawing rules are known.

Vocabulary: 5 well separated colours, 3 shapes, 2 sizes, counts one and two, 4 positions: 240
compositions. Three of a size never fit: at 32 px a large shape is 13 px, and three of them plus
gaps exceed the 30 px a half offers.

Position is the half of the image the group sits in (top, bottom, left, right), not a quadrant: two
large shapes side by side need the 32 px long side of a half (13 + 2 + 13 px plus margins), which a
16 px quadrant does not have. A group lies along its half's long axis, its centre at most 2 px
(scaled) off the image's centre line, every shape at least 1 px away from the border and from the
dividing line. So a group in the top half is always further from the centre vertically than
horizontally, which makes "top" and "left" unambiguous for the checker.

Drawing: PIL without anti-aliasing on white, so every shape pixel has its palette colour exactly.
Lengths are designed at 32 px and scaled with `image_size` (at least 32); shape sides are odd so a
triangle has a centre column. Shapes of a group are >= 2 px apart and never touch, so connected
components are exactly the shapes. Each image gets a random layout (which placement along the long
axis, how far from the border each shape sits) from a generator seeded with `seed`.

Captions: 4 phrasings ("two small red circles at the top", "at the top: two small red circles",
"a pair of small red circles in the top half", "there are two small red circles at the top"), taken
in turn per image, so each composition is seen in every phrasing. `parse_caption` accepts the
grammar these come from, case- and whitespace-insensitively (see `_CAPTION`).

Splits: some (colour, shape) pairs are held out (default red triangle, green circle, blue square:
each colour and shape still appears in training in other pairs). Train holds every image of the
seen pairs; the held-out compositions are dealt to val and test like a checkerboard over (size,
count, position), so both splits cover every held-out pair, size, count and position, and share no
caption. With the defaults (8 images per composition) that is 1,536 train, 192 val and 192 test
images. Rendering takes well under a second and is cached as one .npz per (version, size, images per
composition, seed).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from text2img.data.augment import ImageAugment
from text2img.utils.files import build_once
from text2img.data.base import ArrayImageDataset, ImageCaptionSource, Transform
from text2img.utils.progress import Progress


# Bump when drawing, layout or caption rules change: the cache file name includes it.
RENDER_VERSION = 1

# Pairwise >= ~150 apart in RGB and far from white, so the checker tells them apart even when blurred.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 150, 40),
    "blue": (20, 80, 240),
    "yellow": (240, 200, 10),
    "purple": (160, 30, 160),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = (1, 2)
POSITIONS = ("top", "bottom", "left", "right")
DEFAULT_HELD_OUT = ("red triangle", "green circle", "blue square")
MIN_IMAGE_SIZE = 32
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Composition:
    """The structured truth of one image (or one prompt)."""

    colour: str
    shape: str
    size: str
    count: int
    position: str

    @property
    def pair(self) -> str:
        """The (colour, shape) pair as held-out lists name it, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"


def all_compositions() -> list[Composition]:
    """Every composition, in the fixed order renders and splits refer to."""
    return [Composition(*values) for values in itertools.product(COLOURS, SHAPES, SIZES, COUNTS, POSITIONS)]


# ---------------------------------------------------------------- captions

_WHERE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}


@dataclass(frozen=True)
class _Phrasing:
    """A caption template; fields: count, size, colour, shapes, where, half, be."""

    text: str
    count_words: dict[int, str]


PHRASINGS = (
    _Phrasing("{count} {size} {colour} {shapes} {where}", {1: "a", 2: "two"}),
    _Phrasing("{where}: {count} {size} {colour} {shapes}", {1: "one", 2: "two"}),
    _Phrasing("{count} {size} {colour} {shapes} in the {half} half", {1: "a single", 2: "a pair of"}),
    _Phrasing("there {be} {count} {size} {colour} {shapes} {where}", {1: "one", 2: "two"}),
)


def caption(composition: Composition, phrasing: int) -> str:
    """The caption of `composition` in phrasing number `phrasing` (0 .. len(PHRASINGS) - 1)."""
    template = PHRASINGS[phrasing]
    plural = composition.count > 1
    return template.text.format(
        count=template.count_words[composition.count],
        size=composition.size,
        colour=composition.colour,
        shapes=composition.shape + ("s" if plural else ""),
        where=_WHERE[composition.position],
        half=composition.position,
        be="are" if plural else "is",
    )


_COUNT_OF = {"a": 1, "an": 1, "one": 1, "a single": 1, "two": 2, "a pair of": 2}


def _alternatives(words: Sequence[str]) -> str:
    # Longest first, so "a single" is tried before "a".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _where_pattern(group: str) -> str:
    return rf"(?:at|on|in) the (?P<{group}>{_alternatives(POSITIONS)})(?: half| side)?"


# The grammar of every phrasing: an optional "there is/are", the position before (with an optional
# colon) or after the object phrase, singular or plural nouns.
_CAPTION = re.compile(
    rf"(?:there (?:is|are) )?(?:{_where_pattern('before')}:? )?"
    rf"(?P<count>{_alternatives(list(_COUNT_OF))}) (?P<size>{_alternatives(SIZES)}) "
    rf"(?P<colour>{_alternatives(list(COLOURS))}) (?P<shape>{_alternatives(SHAPES)})s?"
    rf"(?: {_where_pattern('after')})?"
)


def parse_caption(text: str) -> Composition:
    """Invert `caption` for every phrasing, and read prompts a user writes in the same grammar."""
    # Case, spacing, full stops and spaces around the colon are free.
    normal = " ".join(text.casefold().replace(":", " : ").replace(".", " ").split()).replace(" :", ":")
    match = _CAPTION.fullmatch(normal)
    if match is None or (match["before"] is None) == (match["after"] is None):
        raise ValueError(
            f"cannot read {text!r} as a shapes prompt; write e.g. 'two small red circles at the top' "
            f"(colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; sizes {', '.join(SIZES)}; "
            f"counts one, two; positions {', '.join(POSITIONS)})"
        )
    return Composition(
        colour=match["colour"],
        shape=match["shape"],
        size=match["size"],
        count=_COUNT_OF[match["count"]],
        position=match["before"] or match["after"],
    )


# ---------------------------------------------------------------- geometry and drawing


def _scaled(pixels_at_32: float, image_size: int) -> int:
    return max(1, round(pixels_at_32 * image_size / MIN_IMAGE_SIZE))


def _scaled_odd(pixels_at_32: float, image_size: int) -> int:
    """An odd length scaled from the 32 px design, so a triangle has a centre column for its apex."""
    return 2 * round((pixels_at_32 * image_size / MIN_IMAGE_SIZE - 1) / 2) + 1


@dataclass(frozen=True)
class Geometry:
    """The layout's lengths in pixels at one image size (designed at 32 px)."""

    image_size: int
    small: int
    large: int
    margin: int  # to the border and to the line between the halves
    gap: int  # between two shapes: >= 2 so they never touch, even diagonally
    jitter: int  # how far the group's centre may be off the centre line

    @classmethod
    def at(cls, image_size: int) -> Geometry:
        return cls(
            image_size=image_size,
            small=_scaled_odd(7, image_size),
            large=_scaled_odd(13, image_size),
            margin=_scaled(1, image_size),
            gap=max(2, _scaled(2, image_size)),
            jitter=_scaled(2, image_size),
        )

    def side(self, size: str) -> int:
        return self.small if size == "small" else self.large


@dataclass(frozen=True)
class Box:
    """A shape's square bounding box: top-left pixel and side length."""

    left: int
    top: int
    side: int


@cache
def _long_axis_starts(
    image_size: int, side: int, count: int, margin: int, gap: int, jitter: int
) -> list[tuple[int, ...]]:
    """Every placement of `count` boxes along the long axis of a half: starts, in order."""
    usable = range(margin, image_size - margin - side + 1)
    centre = image_size / 2
    return [
        starts
        for starts in itertools.combinations(usable, count)
        if all(b - a >= side + gap for a, b in itertools.pairwise(starts))
        and abs((starts[0] + starts[-1] + side) / 2 - centre) <= jitter
    ]


def layout(composition: Composition, geometry: Geometry, rng: np.random.Generator) -> list[Box]:
    """Random boxes for the composition's shapes inside its half (see the module docstring)."""
    side = geometry.side(composition.size)
    size = geometry.image_size
    placements = _long_axis_starts(
        size, side, composition.count, geometry.margin, geometry.gap, geometry.jitter
    )
    along = placements[rng.integers(len(placements))]
    # Distance from the image border across the half; the box stays `margin` clear of the centre line.
    across = rng.integers(geometry.margin, size // 2 - geometry.margin - side + 1, size=composition.count)
    boxes = []
    for a, b in zip(along, across.tolist(), strict=True):
        if composition.position == "top":
            boxes.append(Box(left=a, top=b, side=side))
        elif composition.position == "bottom":
            boxes.append(Box(left=a, top=size - b - side, side=side))
        elif composition.position == "left":
            boxes.append(Box(left=b, top=a, side=side))
        else:
            boxes.append(Box(left=size - b - side, top=a, side=side))
    return boxes


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour: tuple[int, int, int]) -> None:
    """Fill `shape` inscribed in `box`; PIL draws RGB images without anti-aliasing."""
    x0, y0 = box.left, box.top
    x1, y1 = x0 + box.side - 1, y0 + box.side - 1  # PIL's corners are inclusive
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    else:  # apex up, base on the bottom row
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)


def render(composition: Composition, geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """One [S, S, 3] uint8 image of `composition` with a random layout."""
    image = Image.new("RGB", (geometry.image_size, geometry.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for box in layout(composition, geometry, rng):
        draw_shape(draw, composition.shape, box, COLOURS[composition.colour])
    return np.asarray(image)


@dataclass
class ShapesRender:
    """What rendering produces and the cache stores."""

    images: np.ndarray  # [N, S, S, 3] uint8
    captions: list[str]
    composition_ids: np.ndarray  # [N] index into all_compositions()

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(
                f,
                images=self.images,
                captions=np.array(self.captions, dtype=str),
                composition_ids=self.composition_ids,
            )

    @classmethod
    def load(cls, path: Path) -> ShapesRender:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["images"], data["captions"].tolist(), data["composition_ids"])


def render_shapes(image_size: int, images_per_composition: int, seed: int, progress: Progress) -> ShapesRender:
    """`images_per_composition` images of every composition, phrasings taken in turn; `progress` counts images."""
    geometry = Geometry.at(image_size)
    rng = np.random.default_rng(seed)
    compositions = all_compositions()
    progress.total = len(compositions) * images_per_composition
    images, captions, ids = [], [], []
    for index, composition in enumerate(compositions):
        for i in range(images_per_composition):
            images.append(render(composition, geometry, rng))
            # Offset by the composition so phrasings are equally common for any images_per_composition.
            captions.append(caption(composition, (index + i) % len(PHRASINGS)))
            ids.append(index)
        progress.advance(images_per_composition)
    return ShapesRender(np.stack(images), captions, np.array(ids, dtype=np.int64))


# ---------------------------------------------------------------- source


def _check_held_out(held_out: Sequence[str]) -> frozenset[str]:
    """The held-out pairs, normalised; one-line errors for unknown or training-emptying choices."""
    if isinstance(held_out, str):  # iterating it would yield letters
        raise ValueError(f"data.source.held_out={held_out!r} is one string; give a list, e.g. [{held_out}]")
    pairs = frozenset(" ".join(pair.casefold().split()) for pair in held_out)
    known = {f"{colour} {shape}" for colour in COLOURS for shape in SHAPES}
    for pair in sorted(pairs):
        if pair not in known:
            raise ValueError(
                f"data.source.held_out has unknown pair {pair!r}; use '<colour> <shape>' with colours "
                f"{', '.join(COLOURS)} and shapes {', '.join(SHAPES)}"
            )
    if not pairs:
        raise ValueError("data.source.held_out is empty, so val and test would be empty; hold out at least one pair")
    for word in (*COLOURS, *SHAPES):
        if all(pair in pairs for pair in known if word in pair.split()):
            raise ValueError(
                f"data.source.held_out holds out every {word!r} pair, so training never sees {word!r}; "
                "keep at least one of them"
            )
    return pairs


def _check_augment(augment: Transform | None) -> None:
    """Flips and crops would contradict the captions (left/right, position, size)."""
    if isinstance(augment, ImageAugment) and (augment.hflip > 0 or augment.random_crop_scale < 1):
        raise ValueError(
            "data.source.augment flips or crops, which changes the positions and sizes shapes captions name; "
            "set hflip=0 and random_crop_scale=1 for data=shapes"
        )


def _is_val(composition: Composition) -> bool:
    """Checkerboard over (size, count, position): half of each held-out pair's compositions."""
    parity = (
        SIZES.index(composition.size)
        + COUNTS.index(composition.count)
        + POSITIONS.index(composition.position)
    )
    return parity % 2 == 0


class ShapesSource(ImageCaptionSource):
    """Procedural coloured shapes with compositional captions and held-out (colour, shape) pairs.

    Items: `images` [N, S, S, 3] uint8, `captions`, and `compositions` (the truth of each item).
    Train holds the seen pairs; val and test the `held_out` ones (see the module docstring).
    The render is cached at `<cache_dir>/shapes-r<version>-<size>px-<n>per-seed<seed>.npz` under a
    file lock, so concurrent processes render it once. `augment` applies to "train" only, and must
    not flip or crop.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        cache_dir: str | os.PathLike[str],
        images_per_composition: int = 8,
        held_out: Sequence[str] = DEFAULT_HELD_OUT,
        seed: int = 0,
        augment: Transform | None = None,
    ) -> None:
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"data.source.image_size={image_size} is too small to tell the shapes apart; "
                f"use {MIN_IMAGE_SIZE} or more"
            )
        if images_per_composition < 1:
            raise ValueError(
                f"data.source.images_per_composition={images_per_composition} must be a positive count; use e.g. 8"
            )
        self.held_out = _check_held_out(held_out)
        _check_augment(augment)
        # The fractions are unused: splits follow the held-out pairs (see `split_indices`).
        super().__init__(image_size, 0.0, 0.0, augment)
        self.images_per_composition = images_per_composition
        self.seed = seed
        self.cache_path = Path(cache_dir).expanduser() / (
            f"shapes-r{RENDER_VERSION}-{image_size}px-{images_per_composition}per-seed{seed}.npz"
        )
        build_once(self.cache_path, self._render)
        render = ShapesRender.load(self.cache_path)
        self.images = render.images
        self._captions = render.captions
        every = all_compositions()
        self.compositions = [every[i] for i in render.composition_ids.tolist()]

    def _render(self, path: Path) -> None:
        with Progress(f"rendering shapes at {self.image_size} px", None, "images") as progress:
            render_shapes(self.image_size, self.images_per_composition, self.seed, progress).save(path)
            progress.detail = f"-> {self.cache_path}"

    @property
    def captions(self) -> list[str]:
        return self._captions

    @property
    def identity(self) -> str:
        held_out = ",".join(sorted(self.held_out)).replace(" ", "_")
        return f"{self.cache_path.stem}-heldout-{held_out}"

    @cached_property
    def split_indices(self) -> dict[str, list[int]]:
        indices: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, composition in enumerate(self.compositions):
            if composition.pair not in self.held_out:
                indices["train"].append(i)
            else:
                indices["val" if _is_val(composition) else "test"].append(i)
        return indices

    def _subset(self, indices: list[int], transform: Transform | None) -> ArrayImageDataset:
        return ArrayImageDataset(self.images[indices], [self._captions[i] for i in indices], transform)
