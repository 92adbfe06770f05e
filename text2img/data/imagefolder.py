"""A folder of images captioned by `metadata.jsonl`, the layout diffusers and HF `imagefolder` use.

    data/
      metadata.jsonl        {"file_name": "cats/001.png", "text": "a grey cat"}   (one object per line)
      cats/001.png

Everything is checked at construction, before training starts: a broken layout or metadata line
raises one clear line naming the problem and the fix; a single unreadable image or empty caption
is skipped and counted in one warning. Captions have their whitespace collapsed. Images are loaded
lazily, turned upright (EXIF), converted to RGB (transparency composited on white), and resized and
centre-cropped to a square.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

from text2img.data.base import ImageCaptionDataset, ImageCaptionSource, Transform, uint8_to_tensor

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
_EXAMPLE = '{"file_name": "cat.png", "text": "a grey cat"}'
_LINE_FIX = f"each line must be an object like {_EXAMPLE}"
# What PIL raises for a file it cannot identify, decode or check (truncated, corrupt, missing, huge).
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb_square(path: Path, size: int) -> np.ndarray:
    """The image at `path` as [size, size, 3] uint8: upright, transparency on white, centre-cropped."""
    with Image.open(path) as file:
        image: Image.Image = ImageOps.exif_transpose(file)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        rgb = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb)


def _is_readable(path: Path) -> bool:
    """Cheap integrity check (header and, for PNG, chunk checksums) without decoding pixels."""
    try:
        with Image.open(path) as image:
            image.verify()
    except _UNREADABLE:
        return False
    return True


def _read_metadata(root: Path) -> list[tuple[str, str]]:
    """(file_name, text) per line of `root/metadata.jsonl`, with one-line errors for malformed lines."""
    metadata = root / METADATA
    if not metadata.is_file():
        raise FileNotFoundError(
            f"no {METADATA} in data.path='{root}'; add one with a line per image like {_EXAMPLE}"
        )
    rows: list[tuple[str, str]] = []
    with metadata.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{METADATA} line {number} is not valid JSON: {err.msg}; {_LINE_FIX}"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{METADATA} line {number} is not a JSON object; {_LINE_FIX}")
            for key in ("file_name", "text"):
                if not isinstance(row.get(key), str):
                    problem = "has no" if key not in row else "has a non-string"
                    raise ValueError(f"{METADATA} line {number} {problem} {key!r}; {_LINE_FIX}")
            rows.append((row["file_name"], row["text"]))
    if not rows:
        raise ValueError(f"{metadata} lists no images; add a line per image like {_EXAMPLE}")
    return rows


class ImageFileDataset(ImageCaptionDataset):
    """Images read from disk on access."""

    def __init__(
        self, paths: list[Path], captions: list[str], image_size: int, transform: Transform | None
    ) -> None:
        super().__init__(captions, transform)
        self.paths = paths
        self.image_size = image_size

    def load_image(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            return uint8_to_tensor(load_rgb_square(path, self.image_size))
        except _UNREADABLE as err:  # passed the construction-time check but fails to decode
            raise OSError(
                f"imagefolder: cannot decode {path} ({err}); remove it or its line in {METADATA}"
            ) from err


class ImageFolderSource(ImageCaptionSource):
    """Captioned images from a folder with `metadata.jsonl`; `augment` applies to the "train" split only."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_size: int,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        augment: Transform | None = None,
    ) -> None:
        super().__init__(image_size, val_fraction, test_fraction, augment)
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            problem = "is not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(
                f"data.path='{path}' {problem}; point data.path at a folder with images and {METADATA}"
            )
        rows = _read_metadata(self.root)
        self.paths: list[Path] = []
        self._captions: list[str] = []
        skipped: Counter[str] = Counter()
        for file_name, text in rows:
            caption = " ".join(text.split())
            if not caption:
                skipped["empty caption"] += 1
            elif not _is_readable(self.root / file_name):
                skipped["unreadable image"] += 1
            else:
                self.paths.append(self.root / file_name)
                self._captions.append(caption)
        reasons = ", ".join(f"{n} {reason}{'s' if n > 1 else ''}" for reason, n in sorted(skipped.items()))
        if not self.paths:
            raise ValueError(
                f"imagefolder: none of the {len(rows)} samples in '{self.root}' is usable ({reasons}); "
                f"check the file_name and text fields of {METADATA}"
            )
        if skipped:
            log.warning("imagefolder: skipped %d of %d samples (%s)", skipped.total(), len(rows), reasons)

    @property
    def captions(self) -> list[str]:
        return self._captions

    @cached_property
    def identity(self) -> str:
        # The metadata's content and the image files' sizes and times: editing either invalidates caches.
        digest = hashlib.sha256((self.root / METADATA).read_bytes())
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"imagefolder-{self.root.resolve()}-{digest.hexdigest()[:16]}-{self.image_size}px-{self._split_identity()}"

    def _subset(self, indices: list[int], transform: Transform | None) -> ImageFileDataset:
        return ImageFileDataset(
            [self.paths[i] for i in indices], [self._captions[i] for i in indices], self.image_size, transform
        )
