"""Data module: image/caption splits joined with their cached text embeddings (and, for latent backends,
their cached first-stage latents)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset

from text2img.encoders.base import TextEncoder
from text2img.encoders.cache import EmbeddingCache
from text2img.errors import ConfigError
from text2img.generators.first_stage import FirstStage
from text2img.generators.latent_cache import LatentCache
from text2img.types import Batch, TextEmbedding

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# image, caption, row of the caption's embedding, key, cached first-stage moments (or None)
Item = tuple[torch.Tensor, str, int, int, torch.Tensor | None]


class EmbeddedSplit(Dataset):
    """One split of a source, each item carrying the row of its caption in the embedding table.

    Items are keyed by their position in `order` (default: the split's own order). With `size` larger
    than the split, positions wrap around: prompts repeat and, keyed differently, get new seeds.
    `latents` holds each image's cached first-stage moments, in the split's order, or is None.
    """

    def __init__(
        self,
        images: Dataset,
        rows: list[int],
        order: list[int] | None = None,
        size: int | None = None,
        latents: torch.Tensor | None = None,
    ):
        self.images = images
        self.rows = rows
        self.order = order if order is not None else list(range(len(rows)))
        self.size = len(rows) if size is None else size
        self.latents = latents

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> Item:
        index = self.order[key % len(self.order)]
        image, caption = self.images[index]
        latent = None if self.latents is None else self.latents[index]
        return image, caption, self.rows[index], key, latent


class Text2ImgDataModule(L.LightningDataModule):
    """Serves `Batch`es whose text embeddings come from the on-disk cache.

    `prepare_data` (one process per node) fills the cache for every caption of every split, loading
    the language model only if some caption is missing, and unloads it afterwards; `setup` (every
    process) then reads the cache, which never loads the model. After `cache_latents`, the training
    split's first-stage latents are handled the same way: encoded once in `prepare_data`, read in `setup`
    and served in `Batch.latents`.
    """

    def __init__(
        self,
        source: Any,
        encoder: TextEncoder,
        embedding_cache_dir: str,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        val_samples: int | None = None,
        eval_samples: int | None = None,
        test_split: str = "test",
    ) -> None:
        super().__init__()
        for name, value in (("data.val_samples", val_samples), ("n_samples (data.eval_samples)", eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive number of images, or null for one per prompt")
        self.source = source
        self.encoder = encoder
        self.cache = EmbeddingCache(embedding_cache_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_samples = val_samples
        self.eval_samples = eval_samples
        if test_split not in ("val", "test"):
            raise ValueError(f"split={test_split!r} cannot be evaluated; use test or val (held-out prompts)")
        self.test_split = test_split
        self.splits: dict[str, EmbeddedSplit] = {}
        # What the test stage evaluates: `test_split` as `eval_samples` keyed samples.
        self.test_set: EmbeddedSplit | None = None
        self.table: TextEmbedding | None = None
        self.row_of: dict[str, int] = {}
        self.latent_cache: LatentCache | None = None

    def cache_latents(self, first_stage: FirstStage, cache_dir: str) -> None:
        """Serve the training images' posterior moments under the frozen `first_stage` in `Batch.latents`,
        encoded once into `cache_dir`, so training never runs its encoder."""
        if self.source.augment is not None:
            raise ConfigError(
                "generator.cache_latents=true cannot be combined with data.source.augment: the cache holds latents "
                "of the un-augmented images; set data.source.augment=null or generator.cache_latents=false"
            )
        self.latent_cache = LatentCache(cache_dir, first_stage)

    def _all_captions(self) -> dict[str, list[str]]:
        return {name: list(self.source.split(name).captions) for name in SPLITS}

    def prepare_data(self) -> None:
        captions = self._all_captions()
        self.cache.lookup(self.encoder, sorted({c for split in captions.values() for c in split}))
        self.encoder.unload()
        if self.latent_cache is not None:
            # on the device training will use: a large first stage encodes much faster on a GPU
            device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            self.latent_cache.prepare(self.source, device)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        datasets = {name: self.source.split(name) for name in SPLITS}
        unique = sorted({c for d in datasets.values() for c in d.captions})
        self.table = self.cache.lookup(self.encoder, unique)
        self.row_of = {caption: row for row, caption in enumerate(unique)}
        for name, dataset in datasets.items():
            self.splits[name] = EmbeddedSplit(dataset, [self.row_of[c] for c in dataset.captions])
        if self.latent_cache is not None:
            self.splits["train"].latents = self.latent_cache.load(self.source)
        # Evaluation sets: the split in a fixed shuffled order (grids show varied prompts, not a run of
        # neighbours such as 30 flags), the same in every run; their size is a number of samples, not of
        # batches, so figures do not depend on the number of processes.
        self.test_set = self._evaluation_set(self.splits[self.test_split], self.eval_samples)
        val_size = None if self.val_samples is None else min(self.val_samples, len(self.splits["val"]))
        self.splits["val"] = self._evaluation_set(self.splits["val"], val_size)
        log.info(
            "data: %s; validation on %d samples, test on %d of %s",
            ", ".join(f"{n} {len(d.rows)}" for n, d in self.splits.items()),
            len(self.splits["val"]), len(self.test_set), self.test_split,
        )

    @staticmethod
    def _evaluation_set(split: EmbeddedSplit, size: int | None) -> EmbeddedSplit:
        order = torch.randperm(len(split.rows), generator=torch.Generator().manual_seed(0)).tolist()
        return EmbeddedSplit(split.images, split.rows, order, size)

    def eval_split(self, stage: str) -> str:
        """The split a "val" or "test" stage evaluates."""
        return self.test_split if stage == "test" else "val"

    def calibration_images(self, count: int = 512) -> torch.Tensor:
        """The first `count` training images in [-1, 1] (un-augmented, fixed): the same on every process."""
        images = self.source.split("train", augmented=False)
        return torch.stack([images[i][0] for i in range(min(count, len(images)))])

    def prompts(self, split: str) -> tuple[list[str], TextEmbedding]:
        """The distinct captions of a split, sorted, with their cached embeddings."""
        assert self.table is not None, "call setup() first"
        captions = sorted(set(self.source.split(split).captions))
        rows = torch.tensor([self.row_of[c] for c in captions])
        return captions, self.table[rows]

    def collate(self, items: list[Item]) -> Batch:
        images, captions, rows, keys, latents = zip(*items)
        assert self.table is not None
        text = self.table[torch.tensor(rows)].trimmed()
        return Batch(
            images=torch.stack(images),
            captions=list(captions),
            text=text,
            keys=torch.tensor(keys),
            latents=None if latents[0] is None else torch.stack(latents),
        )

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None
        if not shuffle and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Lightning's default DistributedSampler pads ranks with repeated samples, which would count
            # some images twice in FID; this one splits the set exactly (Lightning keeps a sampler it is given).
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None, "call setup() first"
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)
