"""Training data at scale: tar shards in the layout img2dataset writes, streamed with webdataset.

    shards/00000.tar        000000001.jpg  000000001.txt  000000001.json  000000002.png ...
    shards/00001.tar        (an image, .jpg/.jpeg/.png/.webp, plus a .txt caption or a .json with "caption")

Shards are named by anything webdataset opens: local paths, brace ranges (`/data/{00000..00099}.tar`),
several lists joined by `::`, `https://...` or `pipe:curl -s ...` URLs.

Training streams `train_shards`: every process (DDP rank) and every DataLoader worker of it reads its own
disjoint set of whole shards (every world_size-th by rank, then `wds.split_by_worker`), in a shuffled order,
its samples shuffled through a buffer. One epoch is one pass of each reader over its shards, so no sample is
seen twice in an epoch and the epoch's length per process follows from the shards it was given; the data
module's `epoch_samples` fixes it instead (equal for every process, which DDP needs). The evaluation splits
(`val_shards`, `test_shards`) are small: they are read whole into memory, so validation, FID and grids work as
with any other source. So is a fixed sample of the first `reference_samples` training samples, for what needs
training images as a set (the latent scale calibration, the alignment evaluator).

A sample whose image does not decode or whose caption is missing, not UTF-8 or malformed JSON is skipped, with a
warning that counts them; with `strict=True` it raises instead, naming the shard and the sample key.
The data module that trains from it is `text2img.lightning.WebDataModule`.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from text2img.data.base import ArrayImageDataset, Transform, Unusable, uint8_to_tensor
from text2img.data.imagefolder import _UNREADABLE, load_rgb_square
from text2img.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# image, caption, the caption's draw in [0, caption_draws) (None: no draw; see `text2img.types.Batch.caption_draws`)
StreamItem = tuple[Tensor, str, int | None]


def expand_shards(shards: str | Sequence[str], option: str) -> list[str]:
    """Every shard URL of a brace-expanded string (lists joined by `::`) or a list of them; local shards
    must exist."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls = [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]
    if not urls:
        raise ConfigError(f"{option} lists no shards; give paths or URLs, e.g. /data/{{00000..00009}}.tar")
    missing = [url for url in urls if _is_local(url) and not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(
            f"{option}: {len(missing)} of {len(urls)} shards do not exist (e.g. '{missing[0]}'); check the "
            "path and the brace range, e.g. /data/{00000..00009}.tar"
        )
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


@dataclass
class SampleDecoder:
    """A webdataset stage: raw samples -> (image [size, size, 3] uint8, caption), skipping unusable samples.

    The image is the first of `IMAGE_EXTENSIONS`, made upright, composited on white and centre-cropped like an
    image folder's; the caption is the `.txt` (UTF-8), else the `.json`'s "caption", whitespace collapsed.
    `skipped` counts the samples skipped by this reader, by reason; each of the first ten is a warning, then
    every power of ten, so a badly broken data set is noticed without flooding the log. With `strict`, the
    first unusable sample raises instead, naming its shard and key.
    """

    image_size: int
    strict: bool = False
    skipped: Counter[str] = field(default_factory=Counter)

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[tuple[np.ndarray, str]]:
        for sample in samples:
            try:
                yield self.decode(sample)
            except Unusable as unusable:
                if self.strict:
                    raise DataError(
                        f"webdataset: sample {sample.get('__key__')!r} of shard {sample.get('__url__')!r} is "
                        f"unusable ({unusable}); fix or remove it, or set data.source.strict=false to skip "
                        "unusable samples with a warning"
                    ) from None
                self.skipped[unusable.reason] += 1
                count = self.skipped.total()
                if count <= 10 or str(count).rstrip("0") == "1":
                    log.warning(
                        "webdataset: skipped sample %s of %s (%s); %d skipped so far by this reader",
                        sample.get("__key__"), sample.get("__url__"), unusable, count,
                    )

    def decode(self, sample: dict[str, Any]) -> tuple[np.ndarray, str]:
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if extension is None:
            raise Unusable("no image", f"none of .{', .'.join(IMAGE_EXTENSIONS)}")
        caption = self.caption(sample)
        try:
            image = load_rgb_square(io.BytesIO(sample[extension]), self.image_size, trusted=False)  # type: ignore[arg-type]
        except _UNREADABLE as err:
            raise Unusable("image does not decode", str(err)) from None
        return image, caption

    @staticmethod
    def caption(sample: dict[str, Any]) -> str:
        text: object = ""
        try:
            if "txt" in sample:
                text = sample["txt"].decode("utf-8")
            elif "json" in sample:
                meta = json.loads(sample["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise Unusable("malformed caption", "the .json is not an object")
                text = meta.get("caption") or ""
                if not isinstance(text, str):
                    raise Unusable("malformed caption", 'the .json "caption" is not a string')
        except UnicodeDecodeError as err:
            raise Unusable("caption not UTF-8", f"byte {err.start + 1} of the caption is not UTF-8") from None
        except json.JSONDecodeError as err:
            raise Unusable("malformed caption", f"the .json is not valid JSON: {err.msg}") from None
        caption = " ".join(text.split())
        if not caption:
            raise Unusable("no caption", 'no .txt, and no "caption" in a .json')
        return caption


@dataclass
class _ShardRefused:
    """A webdataset handler for the splits read whole: a shard that cannot be opened or is not a tar is one
    `DataError` naming it (the training stream skips such a shard with a warning instead)."""

    option: str

    def __call__(self, exc: Exception) -> bool:
        url = exc.args[-1] if len(exc.args) > 1 else "?"  # webdataset appends (stream, url) to a reader's error
        problem = exc.args[0] if exc.args else type(exc).__name__
        raise DataError(
            f"webdataset: shard {url!r} of {self.option} cannot be read ({problem}: not a tar file, truncated or "
            f"unreachable); replace it, or remove it from {self.option}"
        ) from exc


@dataclass
class SplitByRank:
    """A webdataset nodesplitter: every `world_size`-th shard from `rank`, like `wds.split_by_node` but with
    the rank given up front. `wds.split_by_node` asks torch.distributed when the stream starts, which
    DataLoader workers started by spawn (macOS, Windows) do not share: each rank's workers would read every
    shard."""

    rank: int = 0
    world_size: int = 1

    def __call__(self, urls: Iterable[Any]) -> Iterator[Any]:
        return itertools.islice(urls, self.rank, None, self.world_size)


@dataclass
class BufferShuffle:
    """`wds.shuffle` through a buffer of `size` samples, seeded from torch's generator when a pass starts.

    Lightning seeds that generator per process and DataLoader worker and it advances between epochs, so the
    order is reproducible from the run's seed yet differs between readers and epochs (a fixed seed would
    repeat one order in every worker and epoch).
    """

    size: int

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return wds.shuffle(self.size, rng=random.Random(int(torch.randint(2**62, ()))))(iter(samples))


@dataclass
class TrainItems:
    """A webdataset stage: decoded samples -> training items, images augmented by `augment`, each caption with its
    draw in [0, `caption_draws`) from torch's generator when `caption_draws` > 1 (the seed of its augmentation)."""

    augment: Transform | None
    caption_draws: int = 1

    def __call__(self, samples: Iterable[tuple[np.ndarray, str]]) -> Iterator[StreamItem]:
        for image, caption in samples:
            tensor = uint8_to_tensor(image)
            if self.augment is not None:
                tensor = self.augment(tensor)
            draw = int(torch.randint(self.caption_draws, ())) if self.caption_draws > 1 else None
            yield tensor, caption, draw


class WebDatasetSource:
    """Captioned images in webdataset shards: `train_shards` streamed, `val_shards`, `test_shards` read whole.

    It offers what the evaluation and the data module read of every source (`split`, `identity`,
    `image_size`, `augment`); `split("train")` is the fixed sample of the first `reference_samples` training
    samples in shard order (training itself streams every shard, see `train_stream`). `shuffle_buffer` is the
    number of samples each reader shuffles through (0: none; more mixes better and holds more raw samples in
    memory). With `strict`, an unusable sample raises (naming its shard and key) instead of being skipped.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str],
        test_shards: str | Sequence[str],
        image_size: int,
        shuffle_buffer: int = 1000,
        reference_samples: int = 1000,
        augment: Transform | None = None,
        strict: bool = False,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"data.source.image_size={image_size} must be a positive pixel count, e.g. 32")
        if shuffle_buffer < 0 or reference_samples < 1:
            raise ConfigError(
                f"data.source.shuffle_buffer={shuffle_buffer} must be >= 0 (0: no shuffle) and "
                f"data.source.reference_samples={reference_samples} >= 1"
            )
        self.urls = {
            "train": expand_shards(train_shards, "data.source.train_shards"),
            "val": expand_shards(val_shards, "data.source.val_shards"),
            "test": expand_shards(test_shards, "data.source.test_shards"),
        }
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.reference_samples = reference_samples
        self.augment = augment
        self.strict = strict
        self._whole: dict[str, tuple[np.ndarray, list[str]]] = {}

    @cached_property
    def identity(self) -> str:
        # The shard lists and, for local shards, their sizes and times: rewriting one invalidates caches.
        digest = hashlib.sha256(str(self.reference_samples).encode())
        for name, urls in self.urls.items():
            for url in urls:
                stamp = f"{os.stat(url).st_size}:{os.stat(url).st_mtime_ns}" if _is_local(url) else ""
                digest.update(f"{name}:{url}:{stamp}\n".encode())
        return f"webdataset-{digest.hexdigest()[:16]}-{self.image_size}px"

    def _read_whole(self, name: str) -> tuple[np.ndarray, list[str]]:
        """A split's images and captions in shard order (for "train": its first `reference_samples`)."""
        if name not in self._whole:
            decoder = SampleDecoder(self.image_size, self.strict)
            # every process reads all of it: no node or worker split, no shuffle
            shards = wds.WebDataset(
                self.urls[name], shardshuffle=False, nodesplitter=None, workersplitter=None,
                empty_check=False, handler=_ShardRefused(f"data.source.{name}_shards"),
            ).compose(decoder)
            limit = self.reference_samples if name == "train" else None
            samples = list(itertools.islice(shards, limit))
            if not samples:
                skipped = ", ".join(f"{reason}: {count}" for reason, count in decoder.skipped.items())
                raise DataError(
                    f"webdataset: data.source.{name}_shards hold no usable sample "
                    f"({f'skipped {skipped}' if skipped else 'the shards are empty'}); "
                    "each sample needs an image (.jpg/.png/.webp) and a .txt or .json caption"
                )
            images, captions = zip(*samples)
            self._whole[name] = np.stack(images), list(captions)
        return self._whole[name]

    def split(self, name: str, augmented: bool = True) -> ArrayImageDataset:
        """The "val" or "test" split whole, or "train"'s fixed reference sample (augmented if `augmented`)."""
        if name not in self.urls:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(self.urls)}")
        images, captions = self._read_whole(name)
        return ArrayImageDataset(images, captions, self.augment if name == "train" and augmented else None)

    def train_stream(
        self,
        rank: int = 0,
        world_size: int = 1,
        samples_per_reader: int | None = None,
        caption_draws: int = 1,
    ) -> wds.WebDataset:
        """The training samples of process `rank` of `world_size`: an IterableDataset of `StreamItem`s.

        Each (rank, DataLoader worker) reader takes its own shards, in an order shuffled anew each pass, and
        shuffles their samples through `shuffle_buffer`. A pass ends with its last shard, or after
        `samples_per_reader` samples (its shards are read again, reshuffled, if they hold fewer).
        """
        stream = wds.WebDataset(
            self.urls["train"],
            handler=wds.warn_and_continue,  # an unreadable shard or URL is skipped with a warning
            shardshuffle=len(self.urls["train"]),
            detshuffle=True,  # shard order: seed + pass number
            seed=int(torch.randint(2**31, ())),
            nodesplitter=SplitByRank(rank, world_size),
            workersplitter=wds.split_by_worker,
        )
        if self.shuffle_buffer > 0:
            stream = stream.compose(BufferShuffle(self.shuffle_buffer))
        stream = stream.compose(SampleDecoder(self.image_size, self.strict), TrainItems(self.augment, caption_draws))
        return stream if samples_per_reader is None else stream.with_epoch(samples_per_reader)
