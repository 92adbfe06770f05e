"""Data module: image/caption splits joined with their cached text embeddings."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from text2img.encoders.base import TextEncoder
from text2img.encoders.cache import EmbeddingCache
from text2img.types import Batch, TextEmbedding

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class EmbeddedSplit(Dataset):
    """One split of a source, each item carrying the row of its caption in the embedding table."""

    def __init__(self, images: Dataset, rows: list[int]) -> None:
        self.images = images
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        image, caption = self.images[index]
        return image, caption, self.rows[index]


class Text2ImgDataModule(L.LightningDataModule):
    """Serves `Batch`es whose text embeddings come from the on-disk cache.

    `prepare_data` (one process per node) fills the cache for every caption of every split, loading
    the language model only if some caption is missing, and unloads it afterwards; `setup` (every
    process) then reads the cache, which never loads the model.
    """

    def __init__(
        self,
        source: Any,
        encoder: TextEncoder,
        embedding_cache_dir: str,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.source = source
        self.encoder = encoder
        self.cache = EmbeddingCache(embedding_cache_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}
        self.table: TextEmbedding | None = None

    def _all_captions(self) -> dict[str, list[str]]:
        return {name: list(self.source.split(name).captions) for name in SPLITS}

    def prepare_data(self) -> None:
        captions = self._all_captions()
        self.cache.lookup(self.encoder, sorted({c for split in captions.values() for c in split}))
        self.encoder.unload()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        datasets = {name: self.source.split(name) for name in SPLITS}
        unique = sorted({c for d in datasets.values() for c in d.captions})
        self.table = self.cache.lookup(self.encoder, unique)
        row_of = {caption: row for row, caption in enumerate(unique)}
        for name, dataset in datasets.items():
            split = EmbeddedSplit(dataset, [row_of[c] for c in dataset.captions])
            # Evaluation order is a fixed shuffle: sample grids show varied prompts, not one run of
            # neighbours (e.g. 30 flags), and are the same in every run.
            order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0)).tolist()
            self.splits[name] = split if name == "train" else Subset(split, order)
        log.info("data: %s", ", ".join(f"{n} {len(s)}" for n, s in self.splits.items()))

    def collate(self, items: list[tuple[torch.Tensor, str, int]]) -> Batch:
        images, captions, rows = zip(*items)
        assert self.table is not None
        text = self.table[torch.tensor(rows)].trimmed()
        return Batch(images=torch.stack(images), captions=list(captions), text=text)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
