"""Deterministic train/val/test assignment by caption, shared by every data source.

A sample's split depends only on its caption text, through a stable hash (BLAKE2b, never Python's
salted `hash()`), so:
- identical captions always land in the same split: a test prompt is never trained on;
- adding or removing samples never moves the others between splits;
- every process, machine and run agrees without storing a split file.
Captions that differ only in case or whitespace count as identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise a one-line ValueError unless both fractions are in [0, 1) and leave room for training."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"data.source.{name}={value} is outside [0, 1); use e.g. 0.05")
    if val_fraction + test_fraction >= 1.0:
        total = val_fraction + test_fraction
        raise ValueError(
            f"data.source.val_fraction + data.source.test_fraction = {total} leaves nothing to train on; keep it below 1"
        )


def caption_bucket(caption: str) -> float:
    """Map a caption to a fraction in [0, 1) that is the same everywhere, forever."""
    key = " ".join(caption.casefold().split()).encode("utf-8")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(caption: str, val_fraction: float, test_fraction: float) -> str:
    """The split ("train", "val" or "test") a caption belongs to."""
    bucket = caption_bucket(caption)
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def split_indices(captions: Sequence[str], val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Indices of `captions` in each split, in their original order."""
    check_fractions(val_fraction, test_fraction)
    indices: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, caption in enumerate(captions):
        indices[split_of(caption, val_fraction, test_fraction)].append(i)
    return indices
