"""The data module of `data=webdataset`: evaluation splits in memory, training streamed from tar shards."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from text2img.data.webdataset import StreamItem, WebDatasetSource
from text2img.errors import ConfigError
from text2img.lightning.datamodule import Text2ImgDataModule
from text2img.types import Batch


class WebDataModule(Text2ImgDataModule):
    """`Text2ImgDataModule` for a `WebDatasetSource`: evaluation as usual, training streamed from the shards.

    The captions of a stream are not known up front, so the `TextConditioner` encodes training captions in the
    step (with the frozen encoder, which then stays loaded) and augments them on the fly (`caption_augment`'s cached
    variants are not used: `streams_training_captions`). `epoch_samples` (all
    processes together) makes every process take the same number of steps per epoch, which DDP requires;
    without it an epoch is one pass over the shards. Resuming from a checkpoint restarts the stream with a new
    shuffle; it does not continue the interrupted epoch.
    """

    streams_training_captions = True

    def __init__(
        self, source: WebDatasetSource, *args: Any, epoch_samples: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(source, *args, **kwargs)
        if epoch_samples is not None and epoch_samples < 1:
            raise ConfigError(f"data.epoch_samples={epoch_samples} must be a positive sample count, or null")
        self.epoch_samples = epoch_samples

    def cache_latents(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            "generator.cache_latents=true encodes the training images once up front, but data=webdataset "
            "streams them; set generator.cache_latents=false"
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        processes, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        workers = max(self.num_workers, 1)
        readers = processes * workers
        shards = len(self.source.urls["train"])
        if shards < readers:
            raise ConfigError(
                f"data.source.train_shards has {shards} shards for {processes} processes x {workers} "
                "dataloader workers: each reader needs its own shard (one without ends its epoch at once "
                f"and leaves DDP waiting); give at least {readers} shards, or lower data.num_workers"
            )
        if processes > 1 and self.epoch_samples is None:
            raise ConfigError(
                f"data=webdataset with {processes} processes needs data.epoch_samples (training samples per "
                "epoch, all processes together) so that every process takes the same number of steps; e.g. "
                "the number of training samples"
            )
        per_reader = None if self.epoch_samples is None else self.epoch_samples // readers
        if per_reader is not None and per_reader < self.batch_size:
            raise ConfigError(
                f"data.epoch_samples={self.epoch_samples} gives each of the {readers} readers fewer samples "
                f"than a batch ({self.batch_size}); raise it to at least {readers * self.batch_size}"
            )
        return DataLoader(
            self.source.train_stream(rank, processes, per_reader, self.caption_draws),
            batch_size=self.batch_size,
            drop_last=True,  # per worker: every batch is full
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # keeps each worker's pass count for the shard shuffle
            collate_fn=self.collate_stream,
        )

    @staticmethod
    def collate_stream(items: list[StreamItem]) -> Batch:
        images, captions, draws = zip(*items)
        return Batch(
            images=torch.stack(images), captions=list(captions),
            caption_draws=None if draws[0] is None else list(draws),
        )
