"""Data module: image/caption splits, keyed evaluation sets and, for latent backends, cached first-stage latents.
Text embeddings are the LightningModule's `TextConditioner`'s: this module serves captions only."""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from text2img.conditioning import CaptionSets
from text2img.data.base import ImageCaptionSource
from text2img.errors import ConfigError
from text2img.generators.first_stage import FirstStage
from text2img.generators.latent_cache import LatentCache
from text2img.types import Batch

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Fewer real images than this and a split is not evaluated: FID and KID need two a side.
MIN_EVAL_IMAGES = 2


# image, caption, the caption's draw (None: no draw), key, cached first-stage moments (or None)
Item = tuple[torch.Tensor, str, int | None, int, torch.Tensor | None]


class KeyedSplit(Dataset):
    """One split of a source, its items keyed by their position in `order` (default: the split's own order).

    With `caption_draws` > 1 (training), each item draws an integer in [0, caption_draws) from torch's global
    generator, which the training loader seeds per batch (and Lightning in DataLoader workers): the
    `TextConditioner`'s choice of text for the caption (`Batch.caption_draws`). With `size` larger than the split,
    positions wrap around: captions repeat and, keyed differently, get new seeds. `latents` holds each image's
    cached first-stage moments, in the split's order, or is None.
    """

    def __init__(
        self,
        images: Dataset,
        order: list[int] | None = None,
        size: int | None = None,
        latents: torch.Tensor | None = None,
        caption_draws: int = 1,
    ):
        self.images = images
        self.order = order if order is not None else list(range(len(images)))
        self.size = len(images) if size is None else size
        self.latents = latents
        self.caption_draws = caption_draws

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> Item:
        index = self.order[key % len(self.order)]
        image, caption = self.images[index]
        draw = int(torch.randint(self.caption_draws, ())) if self.caption_draws > 1 else None
        latent = None if self.latents is None else self.latents[index]
        return image, caption, draw, key, latent


def run_seed() -> int:
    """The run's seed as `seed_everything` set it (inherited by DDP ranks), else torch's: the training order's seed,
    the same on every rank. Not `torch.initial_seed()` alone: ranks > 0 reseed torch with streams of their own
    (`text2img.callbacks.RNGState`), and a loader built after that would shuffle differently on each rank."""
    return int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))


class _ResumableSampler(DistributedSampler):
    """A `DistributedSampler` whose next pass starts `start` samples in."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return itertools.islice(super().__iter__(), start, None)


class ResumableTrainLoader(DataLoader):
    """The training loader: one pass per epoch, each shuffled by (seed, pass) and split across processes (a
    `DistributedSampler`, which Lightning keeps as given), that resumes mid-epoch.

    Each pass starts from `batches_trained()`, the training batches of the run so far, which Lightning restores
    with its loops before the first pass: pass `batches_trained // len(self)`, skipping the batches of it already
    trained on. A resumed run thus sees the batches an uninterrupted one would, where a plain loader replays the
    epoch from its start (Lightning's own epoch count can even jump after a resume from an epoch's last step).

    The items' own randomness (caption variants, augmentation) comes from torch's generator seeded per batch by
    (seed, rank, pass, batch): the same batches in a resumed run, and no draw from the training's random stream
    (`text2img.callbacks.RNGState` restores that one). That holds with `num_workers=0`; workers draw from their
    own streams, which restart with a resumed pass.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, batches_trained: Callable[[], int], **kwargs: Any
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        sampler = _ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        # its own generator: workers' seeds are drawn from it, not from the training's stream
        generator = torch.Generator().manual_seed(seed)
        super().__init__(dataset, batch_size, sampler=sampler, drop_last=True, generator=generator, **kwargs)
        self.seed = seed
        self.rank = rank
        self.batches_trained = batches_trained

    # With these Lightning counts the loader as resumable (else it warns that a resumed epoch replays batches). The
    # position is not kept here: it is the trainer's, restored before the first pass.
    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass

    def __iter__(self) -> Iterator[Batch]:
        epoch, first = divmod(self.batches_trained(), max(len(self), 1))
        self.sampler.set_epoch(epoch)
        self.sampler.start = first * self.batch_size
        batches = super().__iter__()
        return batches if self.num_workers > 0 else self._seeded(batches, epoch, first)

    def _seeded(self, batches: Iterator[Batch], epoch: int, first: int) -> Iterator[Batch]:
        for number in itertools.count(first):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.rank, epoch, number)) % 2**63)
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


class Text2ImgDataModule(L.LightningDataModule):
    """Serves `Batch`es of images, captions and keys (and, after `cache_latents`, the training images' cached
    first-stage latents: encoded once in `prepare_data`, read in `setup` and served in `Batch.latents`).

    The text side is the LightningModule's `TextConditioner`, which asks this module for its captions
    (`caption_sets`); training items carry their caption's draw (`caption_draws`, see `KeyedSplit`).
    """

    # Training captions read from a stream, not known up front (the conditioner cannot cache their variants).
    streams_training_captions = False

    def __init__(
        self,
        source: Any,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        val_samples: int | None = None,
        eval_samples: int | None = None,
        test_split: str = "test",
        caption_draws: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (("data.val_samples", val_samples), ("n_samples (data.eval_samples)", eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive number of images, or null for one per prompt")
        self.source = source
        self.caption_draws = caption_draws
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_samples = val_samples
        self.eval_samples = eval_samples
        if test_split not in ("val", "test"):
            raise ValueError(f"split={test_split!r} cannot be evaluated; use test or val (held-out prompts)")
        self.test_split = test_split
        if isinstance(source, ImageCaptionSource) and not source.split_indices["train"]:
            raise ConfigError(
                f"data: the train split is empty: the captions of all {len(source)} samples fall into val/test "
                f"(data.source.val_fraction={source.val_fraction}, data.source.test_fraction={source.test_fraction}); "
                "lower those fractions or add samples with other captions"
            )
        self.splits: dict[str, KeyedSplit] = {}
        # What the test stage evaluates: `test_split` as `eval_samples` keyed samples.
        self.test_set: KeyedSplit | None = None
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

    def captions(self, split: str) -> list[str]:
        """The distinct captions of a split, sorted."""
        return sorted(set(self.source.split(split).captions))

    def caption_sets(self) -> CaptionSets:
        """The captions the text side must know: the training split's, and the validation and test splits'."""
        return CaptionSets(train=self.captions("train"), evaluation=sorted({*self.captions("val"), *self.captions("test")}))

    def prepare_data(self) -> None:
        # on the device training will use: large models run much faster on a GPU
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        if self.latent_cache is not None:
            self.latent_cache.prepare(self.source, device)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for name in SPLITS:
            draws = self.caption_draws if name == "train" else 1
            self.splits[name] = KeyedSplit(self.source.split(name), caption_draws=draws)
        if self.latent_cache is not None:
            self.splits["train"].latents = self.latent_cache.load(self.source)
        # Evaluation sets: the split in a fixed shuffled order (grids show varied prompts, not a run of
        # neighbours such as 30 flags), the same in every run; their size is a number of samples, not of
        # batches, so figures do not depend on the number of processes.
        # A split too small to evaluate gets an empty evaluation set: Lightning then skips its loop.
        test_size = self.eval_samples if self._evaluable(self.test_split, "testing") else 0
        self.test_set = self._evaluation_set(self.splits[self.test_split], test_size)
        val_size = None if self.val_samples is None else min(self.val_samples, len(self.splits["val"]))
        val_size = val_size if self._evaluable("val", "validation") else 0
        self.splits["val"] = self._evaluation_set(self.splits["val"], val_size)
        log.info(
            "data: %s; validation on %d samples, test on %d of %s",
            ", ".join(f"{n} {len(d.images)}" for n, d in self.splits.items()),
            len(self.splits["val"]), len(self.test_set), self.test_split,
        )

    def _evaluable(self, split: str, stage: str) -> bool:
        """Whether `split` holds enough images to evaluate; if not, a warning that `stage` is skipped."""
        images = len(self.splits[split].images)
        if images >= MIN_EVAL_IMAGES:
            return True
        fraction = getattr(self.source, f"{split}_fraction", None)
        fix = f"add samples to data.source.{split}_shards" if fraction is None else (
            f"raise data.source.{split}_fraction (now {fraction}) or add images with other captions"
        )
        log.warning("data: the %s split has %d image(s), too few to evaluate: %s is skipped; %s", split, images, stage, fix)
        return False

    def evaluated(self, stage: str) -> bool:
        """Whether a "val" or "test" stage has samples to evaluate (see `_evaluable`)."""
        assert self.test_set is not None, "call setup() first"
        return len(self.test_set if stage == "test" else self.splits["val"]) > 0

    @staticmethod
    def _evaluation_set(split: KeyedSplit, size: int | None) -> KeyedSplit:
        order = torch.randperm(len(split.images), generator=torch.Generator().manual_seed(0)).tolist()
        return KeyedSplit(split.images, order, size)

    def eval_split(self, stage: str) -> str:
        """The split a "val" or "test" stage evaluates."""
        return self.test_split if stage == "test" else "val"

    def calibration_images(self, count: int = 512) -> torch.Tensor:
        """The first `count` training images in [-1, 1] (un-augmented, fixed): the same on every process."""
        images = self.source.split("train", augmented=False)
        return torch.stack([images[i][0] for i in range(min(count, len(images)))])

    def collate(self, items: list[Item]) -> Batch:
        images, captions, draws, keys, latents = zip(*items)
        return Batch(
            images=torch.stack(images),
            captions=list(captions),
            keys=torch.tensor(keys),
            latents=None if latents[0] is None else torch.stack(latents),
            caption_draws=None if draws[0] is None else list(draws),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        sampler = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Lightning's default DistributedSampler pads ranks with repeated samples, which would count
            # some images twice in FID; this one splits the set exactly (Lightning keeps a sampler it is given).
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def _batches_trained(self) -> int:
        """Training batches of the run whose step has run (restored on resume): where the next pass starts."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed if self.trainer is not None else 0

    def _train_batch_size(self) -> int:
        """`batch_size`, or every training image of a process where it holds fewer (whole batches only are
        trained on: a larger batch would leave an epoch without a step)."""
        processes = 1 if self.trainer is None else self.trainer.world_size
        per_process = math.ceil(len(self.splits["train"]) / processes)
        if per_process >= self.batch_size:
            return self.batch_size
        log.warning(
            "data: the train split has %d images%s, fewer than data.batch_size=%d: training uses batches of %d",
            len(self.splits["train"]), f" ({per_process} per process)" if processes > 1 else "", self.batch_size,
            per_process,
        )
        return per_process

    def train_dataloader(self) -> DataLoader:
        return ResumableTrainLoader(
            self.splits["train"],
            self._train_batch_size(),
            seed=run_seed(),
            batches_trained=self._batches_trained,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits["val"])

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None, "call setup() first"
        return self._eval_loader(self.test_set)
