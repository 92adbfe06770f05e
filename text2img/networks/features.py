"""Image features of a dataset split, computed once per (dataset, split, resolution, extractor) and cached.

Reference statistics for FID/KID and the alignment evaluator's training data are both derived from
these per-image features, so one pass of the extractor over a split serves every run and sweep.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from text2img.data.base import ImageCaptionSource
from text2img.utils.files import build_once
from text2img.networks.frozen import ImageFeatureExtractor
from text2img.utils.progress import Progress


def extractor_identity(extractor: ImageFeatureExtractor) -> str:
    return f"{extractor.feature_name}-{getattr(extractor, 'input_size', '')}"


def _images_only(items: list[tuple[Tensor, str]]) -> Tensor:
    return torch.stack([image for image, _ in items])


def extract(
    dataset: Dataset,
    extractor: ImageFeatureExtractor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Tensor:
    """Features [N, F] of every image of an image-caption dataset (images in [-1, 1]), in order; `progress`
    advances by each batch's images."""
    features = []
    for images in DataLoader(dataset, batch_size=batch_size, collate_fn=_images_only):
        features.append(extractor(((images + 1) / 2).to(device)).cpu())
        if progress is not None:
            progress.advance(len(images))
    return torch.cat(features)


class RealFeatureCache:
    """`<root>/<key>.safetensors`: the features of one split's real, un-augmented images.

    The key hashes the source's identity, the split and the extractor, and the file's metadata spells
    them out. Files are written once (temporary file + rename) under a lock, so DDP ranks and parallel
    sweep jobs compute a split once and every later run only reads it.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def path(self, source: ImageCaptionSource, split: str, extractor: ImageFeatureExtractor) -> Path:
        name = f"{source.identity}|{split}|{extractor_identity(extractor)}"
        return self.root / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.safetensors"

    def features(
        self, source: ImageCaptionSource, split: str, extractor: ImageFeatureExtractor, device: torch.device | str = "cpu"
    ) -> Tensor:
        """[N, F] features of `split`, in the split's order; computed on first use."""
        path = self.path(source, split, extractor)
        build_once(path, lambda tmp: self._compute(source, split, extractor, tmp, device))
        return load_file(path)["features"]

    def _compute(
        self, source: ImageCaptionSource, split: str, extractor: ImageFeatureExtractor, path: Path, device: torch.device | str
    ) -> None:
        images = source.split(split, augmented=False)
        with Progress(f"{extractor.feature_name} features of the {split} images", len(images), "images") as progress:
            features = extract(images, extractor, device=device, progress=progress)
            metadata = {"source": source.identity, "split": split, "extractor": extractor_identity(extractor)}
            save_file({"features": features.contiguous()}, path, metadata=metadata)
            progress.detail = f"{source.identity} -> {self.path(source, split, extractor)}"
