"""On-disk cache of a frozen first stage's latents of a data source's training images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from text2img.data.base import ImageCaptionSource
from text2img.utils.files import build_once
from text2img.generators.first_stage import FirstStage
from text2img.utils.progress import Progress

LATENT_CACHE_VERSION = 1


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of a module's weights: a first stage retrained in place (same path, same config) gets a new key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """`<root>/<key>.safetensors`: the posterior moments (mean, log-variance) [N, 2C, h, w] of a source's
    un-augmented training images under `first_stage`, in the train split's order.

    Moments rather than latents, so training still draws a new latent from the posterior at every step.
    The key hashes everything the moments depend on: the first stage's identity and weights and the
    source's identity (images, captions, size, splits). The file is written once (temporary file + rename,
    under a lock), so DDP ranks and parallel jobs encode once and never read a half-written file.
    """

    def __init__(self, root: str | Path, first_stage: FirstStage, batch_size: int = 64) -> None:
        self.root = Path(root).expanduser()
        self.first_stage = first_stage
        self.batch_size = batch_size

    def identity(self, source: ImageCaptionSource) -> dict[str, Any]:
        return {
            "version": LATENT_CACHE_VERSION,
            "first_stage": self.first_stage.identity(),
            "weights": weights_digest(self.first_stage),
            "source": source.identity,
            "split": "train",
        }

    def path(self, source: ImageCaptionSource) -> Path:
        return self._path(self.identity(source))

    def _path(self, identity: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.root / f"{digest}.safetensors"

    def prepare(self, source: ImageCaptionSource, device: torch.device | str = "cpu") -> bool:
        """Encode the training split unless its file exists; True when this call encoded it."""
        identity = self.identity(source)
        encoded = False

        def encode_to(tmp: Path) -> None:
            nonlocal encoded
            images = source.split("train", augmented=False)
            with Progress("encoding the training images to latents", len(images), "images") as progress:
                moments = self._encode(images, torch.device(device), progress)
                # the identity in the file's metadata, for people browsing the cache
                save_file({"moments": moments}, str(tmp), metadata={"identity": json.dumps(identity, default=str)})
                progress.detail = f"moments {tuple(moments.shape[1:])}"
            encoded = True

        build_once(self._path(identity), encode_to)
        return encoded

    @torch.no_grad()
    def _encode(self, images: Dataset, device: torch.device, progress: Progress) -> Tensor:
        home = next(self.first_stage.parameters()).device
        self.first_stage.to(device)
        try:
            chunks = []
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([images[i][0] for i in range(start, min(start + self.batch_size, len(images)))])
                chunks.append(self.first_stage.moments(batch.to(device)).float().cpu())
                progress.advance(len(batch))
        finally:
            self.first_stage.to(home)
        return torch.cat(chunks).contiguous()

    def load(self, source: ImageCaptionSource) -> Tensor:
        """The cached moments; `prepare` must have run (on this node)."""
        path = self.path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no cached latents at {path}; call prepare() first (the data module does)")
        return load_file(str(path))["moments"]
