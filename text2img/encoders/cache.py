"""On-disk cache of frozen text embeddings, keyed by everything the encoder's output depends on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from text2img.encoders.base import TextEncoder
from text2img.utils.progress import Progress
from text2img.types import TextEmbedding

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Unique captions of the last lookup that were read from disk (hits) or encoded (misses)."""

    hits: int = 0
    misses: int = 0


# Encoder options added after caches were written, with their defaults: at those values they are left out of
# the key, so existing caches keep matching (identity.json still lists them).
LATER_OPTION_DEFAULTS = {
    "layer_mean": 1, "chat_template": False, "system_prompt": None,
    "layers": None, "layer_norm": False, "combine": "mean", "keep_tokens": "all",
}

# Captions encoded per call when filling the cache: a progress line between calls (SmolLM2 on 2 CPU cores: ~5 s).
# A caption's embedding does not depend on the others encoded with it (up to rounding), so chunks and their order
# change nothing.
ENCODE_CHUNK = 512


def cache_key(encoder: TextEncoder) -> str:
    identity = {
        name: value for name, value in encoder.identity().items()
        if name not in LATER_OPTION_DEFAULTS or value != LATER_OPTION_DEFAULTS[name]
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class EmbeddingCache:
    """`<root>/<key>/*.safetensors` shards, each holding tokens/mask/pooled for a set of captions.

    A shard's captions are in its metadata; its tokens are trimmed to its longest caption. Shards are
    written once (temporary file + rename) and never modified, so reading needs no lock; writing takes
    `<root>/<key>.lock` so processes that start together (DDP ranks) encode each caption once.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.stats = CacheStats()

    def lookup(self, encoder: TextEncoder, captions: Sequence[str], padded: bool = True) -> TextEmbedding:
        """Embeddings of `captions` in order, zero-padded to the encoder's `max_length` (`padded`) or only as long as
        the longest stored shard they come from (a run's whole table: with several layers side by side, a token is
        tens of thousands of features); only captions never seen with this encoder are encoded, and the encoder is
        not loaded at all when there are none."""
        if encoder.trainable:
            raise ValueError(
                f"{type(encoder).__name__} is trainable, so its embeddings change during training and cannot be "
                "cached; encode captions in the training step instead"
            )
        key = cache_key(encoder)
        folder = self.root / key
        unique = list(dict.fromkeys(captions))
        index = self._index(folder)
        missing = [caption for caption in unique if caption not in index]
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / f"{key}.lock")):
                index = self._index(folder)  # another process may have encoded them while this one waited
                missing = [caption for caption in unique if caption not in index]
                if missing:
                    self._write_identity(folder, encoder)
                    shard = self._write_shard(folder, missing, self._encode(encoder, missing))
                    index.update({caption: (shard, row) for row, caption in enumerate(missing)})
        self.stats = CacheStats(hits=len(unique) - len(missing), misses=len(missing))
        log.info("Embedding cache %s: %d hits, %d misses", key, self.stats.hits, self.stats.misses)
        return self._gather(index, captions, encoder.max_length if padded else None, encoder.features)

    @staticmethod
    def _encode(encoder: TextEncoder, captions: list[str]) -> TextEmbedding:
        """`encoder.encode(captions)` in chunks of `ENCODE_CHUNK`, reporting progress after each.

        Chunks are cut from the captions sorted by length, so each batch pads its captions to a similar length:
        1.5x the captions/s of chunks in dataset order for SmolLM2 on OpenMoji.
        """
        order = sorted(range(len(captions)), key=lambda index: len(captions[index]))
        parts = []
        with Progress(f"encoding captions with {type(encoder).__name__}", len(captions), "captions") as progress:
            for start in range(0, len(order), ENCODE_CHUNK):
                parts.append(encoder.encode([captions[index] for index in order[start : start + ENCODE_CHUNK]]))
                progress.advance(len(parts[-1]))
        return TextEmbedding.cat(parts)[torch.tensor(order).argsort()]

    @staticmethod
    def _index(folder: Path) -> dict[str, tuple[Path, int]]:
        """caption -> (shard, row), from the shards' metadata only."""
        index: dict[str, tuple[Path, int]] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as reader:
                for row, caption in enumerate(json.loads(reader.metadata()["captions"])):
                    index.setdefault(caption, (shard, row))
        return index

    @staticmethod
    def _write_identity(folder: Path, encoder: TextEncoder) -> None:
        """identity.json, for people browsing the cache."""
        target = folder / "identity.json"
        if not target.exists():
            scratch = folder / f".identity-{uuid.uuid4().hex}.tmp"
            scratch.write_text(json.dumps(encoder.identity(), indent=2, sort_keys=True) + "\n")
            os.replace(scratch, target)

    @staticmethod
    def _write_shard(folder: Path, captions: list[str], embedding: TextEmbedding) -> Path:
        embedding = embedding.to("cpu", torch.float32).trimmed()
        tensors = {
            "tokens": embedding.tokens.contiguous(),
            "mask": embedding.mask.contiguous(),
            "pooled": embedding.pooled.contiguous(),
        }
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        scratch = folder / f".{name}.tmp"
        save_file(tensors, scratch, metadata={"captions": json.dumps(captions)})
        os.replace(scratch, folder / f"{name}.safetensors")
        return folder / f"{name}.safetensors"

    @staticmethod
    def _gather(
        index: dict[str, tuple[Path, int]], captions: Sequence[str], length: int | None, features: int
    ) -> TextEmbedding:
        """The captions' rows, `length` token columns (None: the longest of the shards read)."""
        by_shard: dict[Path, tuple[list[int], list[int]]] = {}
        for position, caption in enumerate(captions):
            shard, row = index[caption]
            positions, rows = by_shard.setdefault(shard, ([], []))
            positions.append(position)
            rows.append(row)
        if length is None:
            shapes = []
            for shard in by_shard:
                with safe_open(shard, framework="pt") as reader:
                    shapes.append(reader.get_slice("tokens").get_shape()[1])
            length = max(shapes, default=1)
        tokens = torch.zeros(len(captions), length, features)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        pooled = torch.zeros(len(captions), features)
        for shard, (positions, rows) in by_shard.items():
            stored = load_file(shard)
            columns = stored["tokens"].shape[1]  # at most the table's `length`
            tokens[positions, :columns] = stored["tokens"][rows]
            mask[positions, :columns] = stored["mask"][rows]
            pooled[positions] = stored["pooled"][rows]
        return TextEmbedding(tokens, mask, pooled)
