"""A folder of images captioned by `metadata.jsonl`, the layout diffusers and HF `imagefolder` use.

    data/
      metadata.jsonl        {"file_name": "cats/001.png", "text": "a grey cat"}   (one object per line)
      cats/001.png

Everything is checked at construction, before training starts: a broken layout raises one clear line
naming the problem and the fix. A single bad sample (a metadata line that is not UTF-8, not a JSON object
or lacks a string "file_name" or "text"; an empty caption; a path outside the folder; a missing or
undecodable image) is skipped and counted, with its line number, in one warning; with `strict` the first
one is refused instead. Captions have their whitespace collapsed. Images are loaded lazily, turned upright
(EXIF), converted to RGB (transparency composited on white), and resized and centre-cropped to a square.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

from text2img.data.base import ImageCaptionDataset, ImageCaptionSource, Transform, Unusable, uint8_to_tensor
from text2img.errors import DataError

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
_EXAMPLE = '{"file_name": "cat.png", "text": "a grey cat"}'
_LINE_FIX = f"each line must be an object like {_EXAMPLE}"
_SHOWN_LINES = 3  # line numbers listed per reason in the skip warning
# What PIL raises for a file it cannot identify, decode or check (truncated, corrupt, missing, huge).
_UNREADABLE = (OSError, SyntaxError, ValueError)


@contextmanager
def open_image(path: Path | io.BytesIO, trusted: bool = True) -> Iterator[Image.Image]:
    """`Image.open`; for a `trusted` file without PIL's decompression-bomb limit (an error above 179 MP, a guard for
    untrusted uploads): a folder's images are its owner's, and a large scan or panorama is no attack. Scraped
    shards (webdataset) keep the limit: such an image is skipped like any unreadable one."""
    limit = Image.MAX_IMAGE_PIXELS
    if trusted:
        Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            yield image
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def load_rgb_square(path: Path | io.BytesIO, size: int, trusted: bool = True) -> np.ndarray:
    """The image at `path` as [size, size, 3] uint8: upright, transparency on white, centre-cropped."""
    with open_image(path, trusted) as file:
        return square_rgb(file, size)


def square_rgb(image: Image.Image, size: int) -> np.ndarray:
    """`image` as [size, size, 3] uint8: upright (EXIF), transparency on white, centre-cropped and resized."""
    upright: Image.Image = ImageOps.exif_transpose(image)
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        upright = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(ImageOps.fit(upright.convert("RGB"), (size, size), Image.Resampling.LANCZOS))


def _check_decodes(path: Path, size: int) -> None:
    """Decode the image at `path` as training will (at reduced scale where the format allows: JPEG), so a
    truncated file, which passes PIL's `verify`, is caught now rather than mid-training."""
    if path.is_dir():
        raise Unusable("not an image file", f"{path} is a folder; name an image file in it")
    if not path.is_file():
        raise Unusable("missing image", f"no file {path}")
    try:
        with open_image(path) as image:
            image.draft("RGB", (size, size))
            image.load()
    except _UNREADABLE as err:
        raise Unusable("unreadable image", f"{path}: {err}") from None


def _parse_line(raw: bytes) -> tuple[str, str]:
    """(file_name, text) of one metadata line, or `Unusable` saying what is wrong with it."""
    try:
        line = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not an error
    except UnicodeDecodeError as err:
        raise Unusable("not UTF-8", f"byte {err.start + 1} is not UTF-8; save the file as UTF-8") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise Unusable("invalid JSON", f"{err.msg}; {_LINE_FIX}") from None
    if not isinstance(row, dict):
        raise Unusable("not a JSON object", _LINE_FIX)
    for key in ("file_name", "text"):
        if not isinstance(row.get(key), str):
            raise Unusable(f"no string {key!r}", f"{'a non-string' if key in row else 'no'} {key!r}; {_LINE_FIX}")
    return row["file_name"], row["text"]


def _is_outside(file_name: str) -> bool:
    """Whether `file_name` is absolute or climbs out of the folder (by its text: symlinks inside are fine)."""
    return os.path.isabs(file_name) or os.path.normpath(file_name).split(os.sep)[0] == os.pardir


def _line_numbers(numbers: list[int]) -> str:
    """"line 4", "lines 4, 9", "lines 4, 9, 12 and 3 more": the first few of a reason's lines."""
    shown = ", ".join(map(str, numbers[:_SHOWN_LINES]))
    more = f" and {len(numbers) - _SHOWN_LINES} more" if len(numbers) > _SHOWN_LINES else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


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
            raise DataError(
                f"imagefolder: cannot decode {path} ({err}); replace it, or remove it or its line in {METADATA}"
            ) from err


class ImageFolderSource(ImageCaptionSource):
    """Captioned images from a folder with `metadata.jsonl`; `augment` applies to the "train" split only.

    Unusable samples are skipped and reported in one warning (reasons with their first line numbers), or
    with `strict` the first one raises.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_size: int,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        augment: Transform | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(image_size, val_fraction, test_fraction, augment)
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            problem = "is not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(
                f"data.source.path='{path}' {problem}; point data.source.path at a folder with images and {METADATA}"
            )
        metadata = self.root / METADATA
        if not metadata.is_file():
            raise FileNotFoundError(
                f"no {METADATA} in data.source.path='{path}'; add one with a line per image like {_EXAMPLE}"
            )
        self.paths: list[Path] = []
        self._captions: list[str] = []
        skipped: dict[str, list[int]] = {}  # reason -> line numbers
        first_line: dict[tuple[Path, str], int] = {}  # (image, caption) -> the line that listed it first
        # Bytes, decoded line by line: one line that is not UTF-8 must not make the others unreadable. A line of
        # nothing but whitespace and a byte-order mark (Windows editors write one) lists nothing.
        lines = [
            (n, raw) for n, raw in enumerate(metadata.read_bytes().split(b"\n"), start=1)
            if raw.replace(codecs.BOM_UTF8, b"").strip()
        ]
        for number, raw in lines:
            try:
                path, caption = self._sample(raw)
                # the same sample twice (metadata concatenated twice, say) would double its weight in training
                if (first := first_line.setdefault((path, caption), number)) != number:
                    raise Unusable("duplicate line", f"the same image and caption as line {first}")
            except Unusable as unusable:
                if strict:
                    raise DataError(
                        f"imagefolder: {metadata} line {number}: {unusable}; fix or remove the line, or set "
                        "data.source.strict=false to skip unusable samples with a warning"
                    ) from None
                skipped.setdefault(unusable.reason, []).append(number)
                continue
            self.paths.append(path)
            self._captions.append(caption)
        if not lines:
            raise DataError(f"{metadata} lists no images; add a line per image like {_EXAMPLE}")
        report = "; ".join(f"{reason}: {_line_numbers(numbers)}" for reason, numbers in skipped.items())
        if not self.paths:
            raise DataError(
                f"imagefolder: none of the {len(lines)} samples of {metadata} is usable ({report}); "
                f"{_LINE_FIX}, naming an image in the folder"
            )
        if skipped:
            log.warning(
                "imagefolder: skipped %d of %d samples of %s (%s)",
                len(lines) - len(self.paths), len(lines), metadata, report,
            )

    def _sample(self, raw: bytes) -> tuple[Path, str]:
        """The image path and caption of one metadata line, or `Unusable`."""
        file_name, text = _parse_line(raw)
        caption = " ".join(text.split())
        if not caption:
            raise Unusable("empty caption", 'the "text" is empty or blank')
        if _is_outside(file_name):
            raise Unusable("path outside the folder", f"{file_name!r} must be relative to {self.root}")
        path = self.root / file_name
        _check_decodes(path, self.image_size)
        return path, caption

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
